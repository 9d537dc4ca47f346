"""Gated refit (probe/refit.py) and the drift / refit commands' exit codes, on the tiny backbone."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import TINY, invoke, make_image_folder, probe_command, subprocess_env
import probe
from probe.refit import parse_policy, refit
from probe.registry import Registry

CPU = dict(device="cpu", workers=0, progress=False, batch_size=4)
CPU_ARGS = ("--device", "cpu", "--workers", 0, "--no-progress", "--batch-size", 4)
COLORS = {"cat": (220, 40, 40), "dog": (40, 200, 60), "fish": (40, 60, 220)}
SHIFTED = {"cat": (250, 150, 150), "dog": (150, 250, 160), "fish": (150, 160, 250)}  # washed out


@pytest.fixture
def setup(tmp_path):
    """A champion ``shoes@1`` trained on 3 classes x 8 images, its cache and registry."""
    train = make_image_folder(tmp_path / "train", COLORS, per_class=8, seed=0)
    cache, reg = tmp_path / "cache", Registry(tmp_path / "models")
    res = probe.fit(train, backbone=TINY, cache=cache, output=tmp_path / "m.probe", **CPU)
    reg.register(res.path, "shoes")
    return {"tmp": tmp_path, "train": train, "cache": cache, "reg": reg}


def test_refit_extracts_only_new_inputs_and_keeps_the_gate_out_of_training(setup):
    new = make_image_folder(setup["tmp"] / "new", SHIFTED, per_class=5, seed=300)
    shutil.rmtree(setup["train"])  # the old inputs' features must come from the cache alone
    res = refit("shoes", new, registry=setup["reg"], cache=setup["cache"], **CPU)
    assert res.new_stats.new == 15 and res.new_stats.model_batches == math.ceil(15 / 4)
    assert res.n_old == 24  # the champion's training set, read from the cache
    assert res.n_new + len(res.gate_keys) == 15 and len(res.gate_keys) == 3
    challenger = probe.load(res.challenger.path)
    assert not set(challenger.train_keys_) & set(res.gate_keys)
    assert len(challenger.train_keys_) == res.n_train == 24 + res.n_new
    assert res.challenger.parent == 1 and res.challenger.gate["gate_digest"] == res.gate_digest
    assert res.challenger.gate["decision"] == res.decision
    assert {"champion_score", "challenger_score", "tolerance", "metric"} <= set(res.challenger.gate)
    again = refit("shoes", new, registry=setup["reg"], cache=setup["cache"], **CPU)
    assert again.new_stats.new == 0 and again.new_stats.model_batches == 0


def test_policies_choose_the_training_rows(setup):
    new = make_image_folder(setup["tmp"] / "new", SHIFTED, per_class=5, seed=300)
    only_new = refit("shoes", new, registry=setup["reg"], cache=setup["cache"], policy="new", **CPU)
    assert only_new.n_old == 0 and only_new.n_train == only_new.n_new == 12
    window = refit("shoes", new, registry=setup["reg"], cache=setup["cache"], policy="window:20", **CPU)
    assert window.n_train == 20 and window.n_new == 12 and window.n_old == 8
    assert parse_policy("window:3") == ("window", 3)
    with pytest.raises(probe.errors.ProbeError, match="--policy"):
        parse_policy("window:0")


def test_worse_challenger_is_registered_but_not_promoted(setup):
    # New data whose labels are wrong (cat and dog swapped); the gate set is labelled correctly.
    wrong = make_image_folder(setup["tmp"] / "wrong", {"cat": COLORS["dog"], "dog": COLORS["cat"],
                                                       "fish": COLORS["fish"]}, per_class=8, seed=700)
    gate = make_image_folder(setup["tmp"] / "gate", COLORS, per_class=4, seed=900)
    res = refit("shoes", wrong, registry=setup["reg"], cache=setup["cache"], policy="new", gate=gate, **CPU)
    assert res.decision == "rejected" and res.exit_code == 3
    assert res.challenger_score < res.champion_score - 0.005
    reg = setup["reg"]
    assert reg.resolve("shoes").version == 1
    assert reg.resolve("shoes@2").status == "rejected" and not reg.resolve("shoes@2").is_champion


def test_cli_exit_codes_of_refit_and_drift(setup):
    r = ("--registry", setup["reg"].root, "--cache", setup["cache"])
    same = make_image_folder(setup["tmp"] / "same", COLORS, per_class=8, seed=50)
    shifted = make_image_folder(setup["tmp"] / "shifted", SHIFTED, per_class=8, seed=60)
    # drift: 0 without shift, 3 with shift, 1 on an error.
    invoke("drift", "--model", "shoes", same, *r, "--permutations", 50, *CPU_ARGS, expect=0)
    out = invoke("drift", "--model", "shoes", shifted, *r, "--permutations", 50, "--json", *CPU_ARGS, expect=3)
    report = json.loads(out.output)
    assert report["drift"] is True and len(report["most_shifted"]) == 10
    assert {t["name"] for t in report["tests"]} == {"mmd", "classifier", "predicted_labels", "confidence"}
    invoke("drift", setup["train"], shifted, "-b", TINY, "--cache", setup["cache"], "--permutations", 50,
           *CPU_ARGS, expect=3)
    assert "Error:" in invoke("drift", setup["train"], setup["tmp"] / "nope", "-b", TINY, *CPU_ARGS, expect=1).output
    # refit: 4 = no drift, 0 = promoted, 3 = rejected, 1 = error.
    invoke("refit", "shoes", same, "--if-drift", *r, *CPU_ARGS, expect=4)
    out = invoke("refit", "shoes", shifted, "--if-drift", *r, *CPU_ARGS, expect=0)
    assert "PROMOTED: shoes@2" in out.output
    wrong = make_image_folder(setup["tmp"] / "wrong", {"cat": COLORS["dog"], "dog": COLORS["cat"],
                                                       "fish": COLORS["fish"]}, per_class=8, seed=700)
    out = invoke("refit", "shoes", wrong, "--policy", "new", "--gate", same, *r, "--json", *CPU_ARGS, expect=3)
    assert json.loads(out.output)["decision"] == "rejected"
    assert "Error:" in invoke("refit", "shoes", same, "--policy", "bogus", *r, *CPU_ARGS, expect=1).output
    assert Registry(setup["reg"].root).resolve("shoes").version == 2


def test_refit_killed_before_promotion_leaves_the_old_champion(setup):
    """SIGKILL between storing the challenger and the registry transaction (the PROBE_PAUSE_BEFORE_COMMIT hook)."""
    new = make_image_folder(setup["tmp"] / "new", SHIFTED, per_class=5, seed=300)
    marker = setup["tmp"] / "paused"
    args = ("refit", "shoes", new, "--registry", setup["reg"].root, "--cache", setup["cache"], *CPU_ARGS)
    proc = subprocess.Popen(probe_command(*args), env=subprocess_env(PROBE_PAUSE_BEFORE_COMMIT=marker),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), proc.stderr.read().decode() if proc.poll() is not None else "no pause"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    listing = json.loads(invoke("models", "list", "--json", "--registry", setup["reg"].root).output)
    assert [(v["version"], v["is_champion"]) for v in listing] == [(1, True)]
    assert len(list((setup["reg"].root / "objects").glob("*.probe"))) == 2  # the stored, unreferenced challenger
    rerun = invoke(*args, expect=None)
    assert rerun.exit_code in (0, 3), rerun.output
    assert [v.version for v in Registry(setup["reg"].root).versions("shoes")] == [1, 2]


def test_model_drift_reference_is_the_cached_training_set_bounded(setup, monkeypatch):
    from probe import drift
    from probe.registry import load_model

    model = load_model("shoes", registry=setup["reg"])
    same = make_image_folder(setup["tmp"] / "same", COLORS, per_class=4, seed=50)
    shutil.rmtree(setup["train"])  # reference features come from the cache only
    report = drift.check_model(model, same, cache=setup["cache"], n_permutations=20, **CPU)
    assert report.n_reference == 24 and report.n_current == 12
    monkeypatch.setattr(drift, "REFERENCE_MAX", 10)
    assert drift.check_model(model, same, cache=setup["cache"], n_permutations=20, **CPU).n_reference == 10
