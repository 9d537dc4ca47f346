"""The model registry (probe/registry.py): versions, champion, promote / rollback / retire, references, CLI."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import zipfile

import pytest

from conftest import TINY, invoke, make_image_folder
import probe
from probe.model import TRAIN_SET
from probe.registry import Registry, RegistryError, is_model_ref, load_model, parse_ref

CPU_ARGS = ("--device", "cpu", "--workers", 0, "--no-progress")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two model files on the same data (different C), fit once for the module."""
    tmp = tmp_path_factory.mktemp("models")
    data = make_image_folder(tmp / "train", per_class=6)
    a = probe.fit(data, backbone=TINY, cache=tmp / "cache", value=1.0, batch_size=8, output=tmp / "a" / "m.probe")
    b = probe.fit(data, backbone=TINY, cache=tmp / "cache", value=0.01, batch_size=8, output=tmp / "b" / "m.probe")
    return {"a": a.path, "b": b.path, "data": data, "cache": tmp / "cache"}


@pytest.fixture
def reg(tmp_path):
    return Registry(tmp_path / "models")


def test_first_version_is_champion_and_refs_resolve(reg, models):
    v1 = reg.register(models["a"], "shoes")
    v2 = reg.register(models["b"], "shoes")
    assert (v1.version, v1.is_champion, v1.status) == (1, True, "active")
    assert (v2.version, v2.is_champion) == (2, False)
    assert reg.resolve("shoes").version == 1
    assert reg.resolve("shoes@champion").version == 1
    assert reg.resolve("shoes@2").sha256 == v2.sha256
    assert [v.version for v in reg.versions("shoes")] == [1, 2]
    # The file is stored immutably under its sha256, inside the registry.
    assert v2.path == reg.root / "objects" / f"{v2.sha256}.probe" and v2.path.is_file()
    with pytest.raises(RegistryError, match="no version 7"):
        reg.resolve("shoes@7")
    with pytest.raises(RegistryError, match="no model named 'boots'.*shoes"):
        reg.resolve("boots")


def test_version_records_lineage(reg, models):
    v = reg.register(models["a"], "shoes")
    manifest = probe.load(models["a"]).meta_
    assert v.space_digest == probe.load(models["a"]).backbone_["space_digest"]
    assert v.keys_digest == manifest["training"]["keys_digest"]
    assert v.n_train == 18 and v.head["name"] == "logreg" and v.head["chosen"] == {"clf__C": 1.0}
    assert v.metrics["accuracy"] >= 0 and v.sources["source"] == [str(models["data"])]
    assert v.user and v.host and v.created.endswith("Z") and v.parent is None
    assert [e["action"] for e in reg.history("shoes")] == ["register", "promote"]


def test_promote_rollback_retire(reg, models):
    for _ in range(3):
        reg.register(models["a"], "shoes")
    assert reg.promote("shoes", 2).is_champion
    assert reg.promote("shoes", 3).is_champion
    assert reg.rollback("shoes").version == 2  # the previous champion comes back
    assert reg.resolve("shoes").version == 2
    with pytest.raises(RegistryError, match="is the champion"):
        reg.retire("shoes", 2)
    reg.retire("shoes", 3)
    with pytest.raises(RegistryError, match="retired and cannot be promoted"):
        reg.promote("shoes", 3)
    with pytest.raises(RegistryError, match="retired"):
        load_model("shoes@3", registry=reg)
    assert reg.rollback("shoes").version == 1
    with pytest.raises(RegistryError, match="no previous champion"):
        reg.rollback("shoes")
    # Rollback skips a previous champion retired since.
    reg.promote("shoes", 2)
    reg.promote("shoes", 1)
    reg.retire("shoes", 2)
    with pytest.raises(RegistryError, match="no previous champion"):
        reg.rollback("shoes")


def test_references_and_names():
    assert is_model_ref("shoes") and is_model_ref("shoes@3") and is_model_ref("shoes@champion")
    assert not is_model_ref("model.probe") and not is_model_ref("dir/shoes") and not is_model_ref("a b")
    assert parse_ref("shoes") == ("shoes", "champion")
    with pytest.raises(RegistryError, match="invalid model reference"):
        parse_ref("shoes@latest")


def test_invalid_name_is_refused(reg, models):
    for bad in ("../evil", "", "a" * 65, "-x", "a/b"):
        with pytest.raises(RegistryError, match="invalid model name"):
            reg.register(models["a"], bad)
    assert not (reg.root / "registry.sqlite").exists() or reg.names() == []


def test_probe_load_takes_a_reference(reg, models, monkeypatch):
    reg.register(models["a"], "shoes")
    reg.register(models["b"], "shoes")
    monkeypatch.setenv("PROBE_REGISTRY", str(reg.root))
    m = probe.load("shoes@2")
    assert m.meta_["registry"] == {"name": "shoes", "version": 2, "ref": "shoes@2", "sha256": reg.resolve("shoes@2").sha256,
                                  "root": str(reg.root), "status": "active", "champion": False}
    assert m.head_.get_params()["clf__C"] == 0.01
    assert probe.load("shoes").meta_["registry"]["version"] == 1


def test_corrupt_object_and_escaping_paths_are_refused(reg, models, tmp_path):
    v = reg.register(models["a"], "shoes")
    data = bytearray(v.path.read_bytes())
    os.chmod(v.path, 0o644)
    data[-10] ^= 0xFF
    v.path.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="corrupt"):
        load_model("shoes", registry=reg)
    v.path.unlink()
    outside = tmp_path / "elsewhere.probe"
    outside.write_bytes(models["a"].read_bytes())
    v.path.symlink_to(outside)
    with pytest.raises(RegistryError, match="not a plain file inside"):
        load_model("shoes", registry=reg)


def test_model_file_records_training_labels_and_old_files_still_load(models, tmp_path):
    m = probe.load(models["a"])
    keys, labels = m.train_set_
    assert len(keys) == 18 and set(labels) == {"cat", "dog", "fish"} and set(keys) == set(m.train_keys_)
    old = tmp_path / "old.probe"
    with zipfile.ZipFile(models["a"]) as src, zipfile.ZipFile(old, "w") as dst:
        for item in src.namelist():
            if item != TRAIN_SET:
                dst.writestr(item, src.read(item))
    assert probe.load(old).train_set_ is None


def test_readers_see_a_consistent_registry_while_a_writer_commits(reg, models):
    reg.register(models["a"], "shoes")
    errors, seen = [], []

    def read():
        for _ in range(200):
            try:
                seen.append(Registry(reg.root).resolve("shoes").version)
            except Exception as e:  # noqa: BLE001 - the test collects any failure
                errors.append(e)

    t = threading.Thread(target=read)
    t.start()
    for _ in range(5):
        v = reg.register(models["b"], "shoes")
        reg.promote("shoes", v.version)
    t.join()
    assert not errors
    assert seen == sorted(seen)  # the champion only moves forward here
    with sqlite3.connect(reg.db_path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# -- CLI -----------------------------------------------------------------------------------------------------


def test_cli_fit_register_list_show_promote_rollback_retire_diff(models, tmp_path):
    r = ("--registry", tmp_path / "reg")
    common = ("-b", TINY, "--cache", models["cache"], "--batch-size", 8, *CPU_ARGS)
    out = invoke("fit", models["data"], "-o", tmp_path / "m1.probe", "--C", 1, "--register", "shoes", *r, *common)
    assert "registered shoes@1 (champion)" in out.output
    invoke("fit", models["data"], "-o", tmp_path / "m2.probe", "--C", 0.01, "--register", "shoes", *r, *common)
    listing = json.loads(invoke("models", "list", "--json", *r).output)
    assert [(v["version"], v["is_champion"]) for v in listing] == [(1, True), (2, False)]
    assert "shoes@1" in invoke("models", "list", "shoes", *r).output
    assert json.loads(invoke("models", "show", "shoes@2", *r).output)["head"]["chosen"] == {"clf__C": 0.01}
    invoke("models", "promote", "shoes", 2, *r)
    assert json.loads(invoke("models", "show", "shoes", *r).output)["version"] == 2
    diff = invoke("models", "diff", "shoes@1", "shoes@2", *r).output
    assert "head.chosen.clf__C" in diff and "shoes@1" in diff
    invoke("models", "rollback", "shoes", *r)
    invoke("models", "retire", "shoes", 2, *r)
    res = invoke("models", "promote", "shoes", 2, *r, expect=1)
    assert "Error: shoes@2 is retired" in res.output and "Traceback" not in res.output
    # predict and evaluate take references.
    pred = invoke("predict", "shoes@1", models["data"] / "cat", "--cache", models["cache"], *r, *CPU_ARGS)
    assert pred.output.splitlines()[1].split(",")[2] == "cat"
    ev = invoke("evaluate", "shoes", models["data"], "--cache", models["cache"], *r, *CPU_ARGS)
    assert "accuracy" in ev.output
    assert "no model named 'nope'" in invoke("predict", "nope", models["data"], *r, *CPU_ARGS, expect=1).output


def test_cli_list_on_an_empty_registry(tmp_path):
    assert "no models registered" in invoke("models", "list", "--registry", tmp_path / "none").output
    assert not (tmp_path / "none").exists()
