"""The page of ``probe serve`` in a real browser: headless Debian Chromium driven by Selenium.

It serves a registry model behind a bearer token, loads the page, types the token into it, waits for the model
card, uploads an image through the file input, reads the predicted class from the page and compares it with
``ProbeModel.predict``. A screenshot is written to
build/test-artifacts/serve-page.png. Skipped, with the reason, only where Chromium or ChromeDriver is absent.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, TINY, make_image, make_image_folder

pytest.importorskip("fastapi", reason="probe serve needs the [serve] extra")
pytest.importorskip("selenium", reason="the browser test needs selenium (the [dev] extra)")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = REPO_ROOT / "build" / "test-artifacts"


def _browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        reason = "headless Chromium not installed (Debian packages chromium and chromium-driver; `make` installs them)"
        print(f"SKIP: {reason}", file=sys.stderr)
        pytest.skip(reason)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1000", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@pytest.mark.slow
def test_page_uploads_an_image_and_shows_the_prediction(tmp_path):
    import probe
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from probe.serve.app import background_server, create_app

    from probe.registry import Registry

    images = make_image_folder(tmp_path / "images", per_class=6)
    res = probe.fit(images, backbone=TINY, cache=tmp_path / "cache", batch_size=8,
                    output=tmp_path / "pets.probe", progress=False)
    registry = Registry(tmp_path / "models")
    registry.register(res.path, "pets")
    upload = make_image(tmp_path / "upload" / "dog.png", seed=4242, size=(64, 64), color=(40, 200, 60))
    expected = str(res.model.predict([str(upload)])[0])

    driver = _browser(tmp_path / "chromium-profile")
    try:
        app = create_app("pets@champion", registry=registry.root, cache=tmp_path / "cache", token="s3cret")
        with background_server(app) as url:
            driver.set_page_load_timeout(60)
            driver.get(url + "/")
            wait = WebDriverWait(driver, 60)
            # the page itself is public; the model card needs the token, typed into the page
            wait.until(ec.text_to_be_present_in_element((By.ID, "card-status"), "needs a token"))
            driver.find_element(By.ID, "token").send_keys("s3cret")
            driver.find_element(By.ID, "token-save").click()
            wait.until(ec.text_to_be_present_in_element((By.ID, "model-name"), "pets"))
            assert driver.find_element(By.ID, "model-version").text == "version 1"
            card = driver.find_element(By.ID, "card-body").text
            assert TINY in card and "cat" in card and "fish" in card
            driver.find_element(By.ID, "file").send_keys(str(upload))
            wait.until(ec.presence_of_element_located((By.ID, "prediction-class")))
            shown = driver.find_element(By.ID, "prediction-class").text
            bars = [b.get_attribute("data-class") for b in driver.find_elements(By.CSS_SELECTOR, "#bars .bar")]
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "serve-page.png"
            driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    assert shown == expected
    assert len(bars) == 3 and bars[0] == expected
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
