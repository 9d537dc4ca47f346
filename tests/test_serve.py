"""``probe serve``: a real uvicorn server on a free loopback port, the tiny backbone, models fitted on generated
images. Predictions must equal ``ProbeModel.predict_proba``; bad payloads get 4xx and the server keeps serving;
concurrent requests share model batches; a new model version is picked up mid-stream with no failed request;
captured traffic lands in the cache and the served-keys log."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, image_bytes, invoke, make_image_folder

pytest.importorskip("fastapi", reason="probe serve needs the [serve] extra")
httpx = pytest.importorskip("httpx", reason="the serve tests talk HTTP with httpx")

from probe.capture import ServedLog, served_keys, served_log_path  # noqa: E402
from probe.serve import is_loopback  # noqa: E402
from probe.serve.app import background_server, create_app  # noqa: E402
from probe.serve.batcher import Batcher  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two models on the same feature space (different regularization, so different probabilities)."""
    import probe

    root = tmp_path_factory.mktemp("serve")
    images = make_image_folder(root / "images", per_class=6)
    a = probe.fit(images, backbone=TINY, cache=root / "cache", batch_size=8, output=root / "a.probe", progress=False)
    b = probe.fit(images, backbone=TINY, cache=root / "cache", batch_size=8, value=0.001,
                  output=root / "b.probe", progress=False)
    return {"root": root, "images": sorted(images.rglob("*.png")), "a": root / "a.probe", "b": root / "b.probe",
            "model_a": a.model, "model_b": b.model}


def _post_image(client, url, data: bytes, ctype="image/png", **params):
    return client.post(f"{url}/predict", content=data, headers={"content-type": ctype}, params=params)


def _proba(prediction: dict, classes) -> np.ndarray:
    by_class = {t["class"]: t["probability"] for t in prediction["top_k"]}
    return np.array([by_class[str(c)] for c in classes])


def test_single_and_batch_predictions_equal_predict_proba(models, tmp_path):
    files = models["images"][::3]
    model = models["model_a"]
    expected = model.predict_proba([str(f) for f in files])
    app = create_app(models["a"], cache=tmp_path / "cache")
    with background_server(app) as url, httpx.Client(timeout=60) as client:
        # one image per request, raw body
        for f, exp in zip(files, expected):
            r = _post_image(client, url, f.read_bytes(), top_k=10)
            assert r.status_code == 200, r.text
            (p,) = r.json()["predictions"]
            np.testing.assert_allclose(_proba(p, model.classes_), exp, rtol=1e-5, atol=1e-6)
            assert p["class"] == str(model.classes_[np.argmax(exp)])
        # several images in one multipart request
        r = client.post(f"{url}/predict", params={"top_k": 10},
                        files=[("file", (f.name, f.read_bytes(), "image/png")) for f in files])
        assert r.status_code == 200, r.text
        got = np.stack([_proba(p, model.classes_) for p in r.json()["predictions"]])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        # several images as JSON base64 (a data: URL prefix is accepted)
        images = [base64.b64encode(f.read_bytes()).decode() for f in files]
        images[0] = "data:image/png;base64," + images[0]
        r = client.post(f"{url}/predict", json={"images": images}, params={"top_k": 10})
        assert r.status_code == 200, r.text
        got = np.stack([_proba(p, model.classes_) for p in r.json()["predictions"]])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        # top_k trims the list, sorted by probability
        r = _post_image(client, url, files[0].read_bytes(), top_k=2)
        top = r.json()["predictions"][0]["top_k"]
        assert len(top) == 2 and top[0]["probability"] >= top[1]["probability"]


def test_health_metadata_openapi_and_page(models, tmp_path):
    app = create_app(models["a"], cache=tmp_path / "cache")
    with background_server(app) as url, httpx.Client(timeout=60) as client:
        assert client.get(f"{url}/health").json() == {"status": "ok"}
        meta = client.get(f"{url}/metadata").json()
        assert meta["name"] == "a" and meta["version"] is None
        assert meta["classes"] == ["cat", "dog", "fish"]
        assert meta["backbone"]["name"] == TINY and meta["backbone"]["dim"] == models["model_a"].backbone_["dim"]
        assert meta["metrics"]["accuracy"] == models["model_a"].meta_["metrics"]["accuracy"]
        assert meta["lineage"]["training"]["keys_digest"] == models["model_a"].meta_["training"]["keys_digest"]
        schema = client.get(f"{url}/openapi.json").json()
        assert {"/predict", "/health", "/metadata"} <= set(schema["paths"])
        assert "multipart/form-data" in schema["paths"]["/predict"]["post"]["requestBody"]["content"]
        page = client.get(f"{url}/")
        assert page.status_code == 200 and 'id="file"' in page.text
        assert "http://" not in page.text and "https://" not in page.text  # no CDN, nothing external


def _bad_payloads(tmp_path) -> list[tuple[str, dict, int]]:
    png = image_bytes(3, (48, 48))
    big = io.BytesIO()
    Image.new("RGB", (300, 300), (10, 20, 30)).save(big, format="PNG")  # 90,000 px: over max_pixels=50,000
    strip = io.BytesIO()
    Image.new("RGB", (3000, 1), (10, 20, 30)).save(strip, format="PNG")  # resized to 96000x32: extreme ratio
    return [
        ("empty body", {"content": b"", "headers": {"content-type": "image/png"}}, 400),
        ("truncated png", {"content": png[: len(png) // 2], "headers": {"content-type": "image/png"}}, 422),
        ("text as image", {"content": b"hello, not an image", "headers": {"content-type": "image/jpeg"}}, 422),
        ("wrong content type", {"content": png, "headers": {"content-type": "text/plain"}}, 415),
        ("no content type", {"content": png, "headers": {"content-type": ""}}, 415),
        ("body over the limit", {"content": b"\0" * 300_000, "headers": {"content-type": "image/png"}}, 413),
        ("decompression bomb", {"content": big.getvalue(), "headers": {"content-type": "image/png"}}, 422),
        ("extreme aspect ratio", {"content": strip.getvalue(), "headers": {"content-type": "image/png"}}, 422),
        ("malformed json", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400),
        ("json without images", {"json": {"image": "x"}}, 400),
        ("bad base64", {"json": {"images": ["***"]}}, 400),
        ("multipart without a file", {"data": {"field": "value"}, "files": {}}, 400),
        ("malformed multipart", {"content": b"--x\r\nbroken", "headers": {
            "content-type": "multipart/form-data; boundary=x"}}, 400),
        ("one bad image among good ones", {"files": [("file", ("a.png", png, "image/png")),
                                                     ("file", ("b.png", b"garbage", "image/png"))]}, 422),
    ]


def test_bad_payloads_get_4xx_and_the_server_keeps_serving(models, tmp_path):
    app = create_app(models["a"], cache=tmp_path / "cache", max_body_bytes=200_000, max_pixels=50_000)
    good = models["images"][0].read_bytes()
    with background_server(app) as url, httpx.Client(timeout=60) as client:
        for name, kwargs, status in _bad_payloads(tmp_path):
            if name == "multipart without a file":  # httpx sends urlencoded without files; force multipart
                r = client.post(f"{url}/predict", files={"field": (None, "value")})
            else:
                r = client.post(f"{url}/predict", **kwargs)
            assert r.status_code == status, f"{name}: {r.status_code} {r.text}"
            detail = r.json()["detail"]
            assert isinstance(detail, str) and detail, name
            ok = _post_image(client, url, good)
            assert ok.status_code == 200, f"after {name}: {ok.text}"
        assert "pixel" in client.post(f"{url}/predict", **_bad_payloads(tmp_path)[6][1]).json()["detail"]
        stats = client.get(f"{url}/metadata").json()["serving"]
        assert stats["rejected"] >= len(_bad_payloads(tmp_path))


def test_a_slow_batch_times_out_with_504_and_the_next_request_is_served(models, tmp_path):
    app = create_app(models["a"], cache=tmp_path / "cache", timeout_s=0.3)
    batcher = app.state.batcher
    real = batcher.run_batch
    release = threading.Event()

    def stuck(items):
        release.wait(10)
        return real(items)

    good = models["images"][0].read_bytes()
    with background_server(app) as url, httpx.Client(timeout=60) as client:
        batcher.run_batch = stuck
        r = _post_image(client, url, good)
        assert r.status_code == 504 and "longer than" in r.json()["detail"]
        batcher.run_batch = real
        release.set()
        r = _post_image(client, url, good)
        assert r.status_code == 200, r.text


def test_token_guards_every_endpoint_but_health_and_the_page(models, tmp_path):
    app = create_app(models["a"], cache=tmp_path / "cache", token="s3cret")
    good = models["images"][0].read_bytes()
    with background_server(app) as url, httpx.Client(timeout=60) as client:
        assert client.get(f"{url}/health").status_code == 200
        assert client.get(f"{url}/").status_code == 200
        for path in ("/metadata", "/openapi.json"):
            assert client.get(f"{url}{path}").status_code == 401
            assert client.get(f"{url}{path}", headers={"authorization": "Bearer wrong"}).status_code == 401
            assert client.get(f"{url}{path}", headers={"authorization": "Bearer s3cret"}).status_code == 200
        assert _post_image(client, url, good).status_code == 401
        r = client.post(f"{url}/predict", content=good,
                        headers={"content-type": "image/png", "authorization": "Bearer s3cret"})
        assert r.status_code == 200


def test_cli_refuses_a_public_bind_without_a_token(models, monkeypatch):
    monkeypatch.delenv("PROBE_TOKEN", raising=False)
    res = invoke("serve", models["a"], "--host", "0.0.0.0", expect=1)
    assert "without a bearer token" in res.output and len(res.output.strip().splitlines()) == 1
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")


def test_cli_serve_rejects_a_missing_model():
    res = invoke("serve", "no-such-model.probe", expect=1)
    assert "no-such-model.probe" in res.output


# -- batching ------------------------------------------------------------------------------------------------


def test_batcher_gathers_concurrent_submits_into_one_batch():
    calls = []

    def run_batch(items):
        calls.append(list(items))
        return [x * 10 for x in items]

    async def main():
        b = Batcher(run_batch, max_batch=8, max_wait_ms=1000)
        await b.start()
        try:
            # 6 requests queued before the collector runs, one with two items: one batch of 7, in order
            results = await asyncio.gather(*(b.submit([i]) for i in range(5)), b.submit([5, 6]))
            more = await asyncio.gather(*(b.submit([i]) for i in range(10)))  # over max_batch: two batches
        finally:
            await b.stop()
        return results, more

    results, more = asyncio.run(main())
    assert results == [[0], [10], [20], [30], [40], [50, 60]]
    assert more == [[i * 10] for i in range(10)]
    assert [len(c) for c in calls] == [7, 8, 2]


def test_batcher_survives_a_failing_batch_and_fails_only_its_items():
    def run_batch(items):
        if "boom" in items:
            raise RuntimeError("boom")
        return [ValueError(x) if x == "bad" else x.upper() for x in items]

    async def main():
        b = Batcher(run_batch, max_batch=4, max_wait_ms=0)
        await b.start()
        try:
            with pytest.raises(RuntimeError):
                await b.submit(["boom"])
            with pytest.raises(ValueError):
                await b.submit(["ok", "bad"])
            return await b.submit(["ok"])
        finally:
            await b.stop()

    assert asyncio.run(main()) == ["OK"]


def test_batcher_waits_only_for_announced_requests():
    calls = []

    def run_batch(items):
        calls.append(list(items))
        return items

    async def main():
        b = Batcher(run_batch, max_batch=8, max_wait_ms=5000)
        await b.start()
        try:
            alone = await asyncio.wait_for(b.submit([1]), 2)  # nobody announced: runs without waiting 5 s

            async def late(x):
                with b.expecting():
                    await asyncio.sleep(0.05)  # reading and decoding
                return await b.submit([x])

            together = await asyncio.gather(b.submit([2]), late(3), late(4))
        finally:
            await b.stop()
        return alone, together

    alone, together = asyncio.run(main())
    assert alone == [1] and together == [[2], [3], [4]]
    assert calls == [[1], [2, 3, 4]]


def test_concurrent_requests_share_model_batches(models, tmp_path):
    n = 12
    app = create_app(models["a"], cache=tmp_path / "cache", max_batch=n, max_wait_ms=5)
    files = models["images"][:n]
    expected = models["model_a"].predict_proba([str(f) for f in files])
    batcher = app.state.batcher
    real = batcher.run_batch

    def first_batch_waits_for_the_rest(items):
        # Hold the first batch until every other request is queued, as a slow model would: the rest must then
        # be served together, not one by one.
        if batcher.stats.batches == 0:
            deadline = time.monotonic() + 60
            while batcher._queue.qsize() < n - len(items) and time.monotonic() < deadline:
                time.sleep(0.01)
        return real(items)

    batcher.run_batch = first_batch_waits_for_the_rest
    with background_server(app) as url, httpx.Client(timeout=60) as client:
        barrier = threading.Barrier(n)
        out: list = [None] * n

        def one(i):
            barrier.wait()
            out[i] = _post_image(client, url, files[i].read_bytes(), top_k=10)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(r.status_code == 200 for r in out)
        got = np.stack([_proba(r.json()["predictions"][0], models["model_a"].classes_) for r in out])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        serving = client.get(f"{url}/metadata").json()["serving"]
    assert serving["batcher"]["items"] == n
    assert serving["batcher"]["batches"] <= 2  # the held batch, then everything queued behind it at once
    assert serving["model_batches"] < n  # ... and backbone forward passes, not one per request


# -- hot swap ------------------------------------------------------------------------------------------------


class _Stream:
    """Requests in a loop on a thread until stopped; records every status code and served version."""

    def __init__(self, url: str, data: bytes):
        self.url, self.data = url, data
        self.results: list[tuple[int, object, dict | None]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                try:
                    r = _post_image(client, self.url, self.data, top_k=10)
                    body = r.json() if r.status_code == 200 else None
                    self.results.append((r.status_code, body and body["version"], body))
                except httpx.HTTPError as e:
                    self.results.append((0, repr(e), None))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(60)


def _wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_replacing_the_model_file_swaps_models_with_no_failed_request(models, tmp_path):
    served = tmp_path / "served.probe"
    shutil.copy(models["a"], served)
    image = models["images"][1]
    exp_a, exp_b = (models[m].predict_proba([str(image)])[0] for m in ("model_a", "model_b"))
    assert not np.allclose(exp_a, exp_b, atol=1e-3)
    app = create_app(served, cache=tmp_path / "cache", poll_s=0.1)
    with background_server(app) as url, httpx.Client(timeout=60) as client:
        sha_a = client.get(f"{url}/metadata").json()["source"]["sha256"]
        with _Stream(url, image.read_bytes()) as stream:
            assert _wait_for(lambda: len(stream.results) >= 3)
            tmp = tmp_path / ".new.probe"
            shutil.copy(models["b"], tmp)
            os.replace(tmp, served)  # an atomic replacement, as a deployment would do it
            assert _wait_for(lambda: client.get(f"{url}/metadata").json()["source"]["sha256"] != sha_a)
            n = len(stream.results)
            assert _wait_for(lambda: len(stream.results) >= n + 3)
        meta = client.get(f"{url}/metadata").json()
    assert [s for s, _, _ in stream.results if s != 200] == []
    assert meta["serving"]["swaps"] == 1
    classes = models["model_a"].classes_
    first, last = stream.results[0][2]["predictions"][0], stream.results[-1][2]["predictions"][0]
    np.testing.assert_allclose(_proba(first, classes), exp_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_proba(last, classes), exp_b, rtol=1e-5, atol=1e-6)


def test_a_broken_new_version_keeps_the_old_one_serving(models, tmp_path):
    served = tmp_path / "served.probe"
    shutil.copy(models["a"], served)
    app = create_app(served, cache=tmp_path / "cache", poll_s=0)
    predictor = app.state.predictor
    (tmp_path / "junk").write_bytes(b"not a zip")
    os.replace(tmp_path / "junk", served)
    assert predictor.refresh() is False
    assert predictor.current.name == "served" and predictor.swaps == 0
    assert predictor.refresh() is False  # the same broken version is not retried on every poll


# -- capture -------------------------------------------------------------------------------------------------


def test_capture_stores_served_features_and_logs_their_keys(models, tmp_path):
    from probe.cache import FeatureCache

    cache = tmp_path / "cache"
    files = models["images"][:4]
    app = create_app(models["a"], cache=cache, capture=True)
    with background_server(app) as url, httpx.Client(timeout=60) as client:
        keys = []
        for f in files + files[:1]:  # the repeat is logged twice, stored once
            r = _post_image(client, url, f.read_bytes())
            assert r.status_code == 200
            keys.append(r.json()["predictions"][0]["key"])
        space = app.state.predictor.current.extractor.space
        # every captured batch is a new segment; the server must not keep a file open per batch
        open_files = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
        extra = [image_bytes(900 + i, (40, 40)) for i in range(15)]
        for data in extra:
            assert _post_image(client, url, data).status_code == 200
        if open_files is not None:
            assert len(os.listdir("/proc/self/fd")) < open_files + 10
    assert len(set(keys)) == 4 and served_keys(cache, "a")[:4] == list(dict.fromkeys(keys))
    assert len(served_keys(cache, "a")) == 4 + 15
    assert served_keys(cache, "a", space=space.id) == served_keys(cache, "a")
    assert served_keys(cache, "a", space="other") == []
    lines = served_log_path(cache, "a").read_text().splitlines()
    assert len(lines) == 5 + 15
    store = FeatureCache(cache).open(space, create=False)
    feats = store.get(served_keys(cache, "a")[:4])
    expected = models["model_a"].features([str(f) for f in files], cache=tmp_path / "other-cache").features
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)


def test_served_log_skips_a_torn_last_line_and_filters_by_time(tmp_path):
    log = ServedLog(tmp_path, "m@1/x")
    log.append(["a" * 64, "b" * 64], space="s1", version=1)
    log.close()
    path = served_log_path(tmp_path, "m@1/x")
    assert path.parent == tmp_path / "served" and "/" not in path.name
    with open(path, "ab") as f:
        f.write(b'{"time": "2030-01-01T00:00:00+00:00", "key": "cc')  # a crash mid-write
    assert served_keys(tmp_path, "m@1/x") == ["a" * 64, "b" * 64]
    assert served_keys(tmp_path, "m@1/x", since="2100-01-01") == []
    assert served_keys(tmp_path, "m@1/x", since="2000-01-01T00:00:00") == ["a" * 64, "b" * 64]
    assert served_keys(tmp_path, "never-served") == []


# -- the registry: promotion and rollback while serving; drift on captured traffic ----------------------------


@pytest.fixture
def registry(models, tmp_path):
    from probe.registry import Registry

    reg = Registry(tmp_path / "models")
    reg.register(models["a"], "pets")  # version 1, the champion
    reg.register(models["b"], "pets")  # version 2
    return reg


def test_promotion_and_rollback_during_a_stream_with_no_failed_request(models, registry, tmp_path):
    image = models["images"][1]
    exp_a, exp_b = (models[m].predict_proba([str(image)])[0] for m in ("model_a", "model_b"))
    classes = models["model_a"].classes_
    app = create_app("pets", registry=registry.root, cache=tmp_path / "cache", poll_s=0.1)
    with background_server(app) as url, httpx.Client(timeout=60) as client:
        version = lambda: client.get(f"{url}/metadata").json()["version"]  # noqa: E731
        meta = client.get(f"{url}/metadata").json()
        assert (meta["name"], meta["version"], meta["source"]["is_champion"]) == ("pets", 1, True)
        with _Stream(url, image.read_bytes()) as stream:
            assert _wait_for(lambda: len(stream.results) >= 3)
            registry.promote("pets", 2)
            assert _wait_for(lambda: version() == 2)
            n = len(stream.results)
            assert _wait_for(lambda: len(stream.results) >= n + 3)
            after_promotion = stream.results[-1]
            registry.rollback("pets")
            assert _wait_for(lambda: version() == 1)
            n = len(stream.results)
            assert _wait_for(lambda: len(stream.results) >= n + 3)
        meta = client.get(f"{url}/metadata").json()
    assert [s for s, _, _ in stream.results if s != 200] == []
    versions = [v for _, v, _ in stream.results]
    assert versions[0] == 1 and 2 in versions and versions[-1] == 1
    assert after_promotion[1] == 2
    np.testing.assert_allclose(_proba(after_promotion[2]["predictions"][0], classes), exp_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_proba(stream.results[-1][2]["predictions"][0], classes), exp_a, rtol=1e-5, atol=1e-6)
    assert meta["serving"]["swaps"] == 2 and meta["source"]["ref"] == "pets@1"


def test_an_unknown_registry_reference_is_a_one_line_error(registry, tmp_path):
    res = invoke("serve", "cats@champion", "--registry", registry.root, expect=1)
    assert "cats" in res.output and len(res.output.strip().splitlines()) == 1


def test_drift_runs_on_captured_traffic(models, registry, tmp_path):
    import json

    from conftest import make_image

    cache = tmp_path / "cache"
    shutil.copytree(models["root"] / "cache", cache)  # holds the training features drift compares with
    shifted = [make_image(tmp_path / "traffic" / f"{i}.png", seed=500 + i, color=(128, 128, 128)) for i in range(12)]
    app = create_app("pets", registry=registry.root, cache=cache, capture=True, poll_s=0)
    with background_server(app) as url, httpx.Client(timeout=60) as client:
        for f in shifted:
            assert _post_image(client, url, f.read_bytes()).status_code == 200
    assert len(served_keys(cache, "pets")) == 12
    res = invoke("drift", "--model", "pets", "served", "--registry", registry.root, "--cache", cache,
                 "--permutations", 50, "--json", "--device", "cpu", expect=None)
    report = json.loads(res.output)
    assert res.exit_code == 3 and report["drift"] is True, res.output
    assert report["n_current"] == 12 and report["n_reference"] == len(models["model_a"].train_keys_)
    assert all(s["path"].startswith("served:") for s in report["most_shifted"])
    # nothing served under another name: a clear one-line error
    res = invoke("drift", "--model", models["a"], "served", "--cache", cache, "--device", "cpu", expect=1)
    assert "no captured traffic" in res.output


def test_cli_serves_with_a_token_from_the_environment(models, tmp_path):
    """`probe serve` itself, in a subprocess: binds the port, takes PROBE_TOKEN, answers, stops on SIGTERM."""
    import socket
    import subprocess

    from conftest import probe_command, subprocess_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(probe_command("serve", models["a"], "--port", port, "--cache", tmp_path / "cache"),
                            env=subprocess_env(PROBE_TOKEN="t0ken"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert _wait_for(up, timeout=120)
        assert httpx.get(f"{url}/metadata").status_code == 401
        r = httpx.post(f"{url}/predict", content=models["images"][0].read_bytes(),
                       headers={"content-type": "image/png", "authorization": "Bearer t0ken"})
        assert r.status_code == 200 and r.json()["model"] == "a"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert f"serving a on {url}/" in out
