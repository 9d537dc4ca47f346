"""The backbone registry: names -> frozen modules with their Preprocess, dim and weights digest."""

from __future__ import annotations

import hashlib

import pytest
import torch

from conftest import REPO_ROOT, TINY
from probe.backbones import (
    DEFAULT_BACKBONE,
    TinyCNN,
    backbone_names,
    get_spec,
    load_backbone,
    state_sha256,
)
from probe.errors import BackboneNotFoundError, ProbeError, WeightsUnavailableError
from probe.preprocess import Preprocess


def sha256_of(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def batch(n=3, size=32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def feats(bb, x) -> torch.Tensor:
    with torch.inference_mode():
        return bb.features(x)


# -- the tiny test backbone ----------------------------------------------------------------------------------


def test_tiny_backbone_is_frozen_seeded_and_described():
    bb = load_backbone(TINY)
    assert bb.name == TINY and bb.dim == 32
    assert bb.layer == "penultimate" and bb.pooling == "none"
    assert bb.preprocess == Preprocess(resize=32, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert not bb.module.training
    assert not any(p.requires_grad for p in bb.module.parameters())
    assert bb.weights_sha256 == state_sha256(bb.module) == load_backbone(TINY).weights_sha256
    x = batch()
    out = feats(bb, x)
    assert out.shape == (3, 32)
    assert torch.equal(out, feats(load_backbone(TINY), x))  # seeded: same weights every time
    space = bb.feature_space()
    assert (space.backbone, space.dim, space.layer, space.pooling) == (TINY, 32, "penultimate", "none")
    assert space.preprocess == bb.preprocess.to_dict() and space.weights_sha256 == bb.weights_sha256
    assert bb.feature_space(dtype="float16").digest != space.digest


def test_layer_and_pooling_give_another_feature_space():
    base = load_backbone(TINY)
    conv1 = load_backbone(TINY, layer="conv1", pooling="avg")
    assert conv1.dim == 16
    assert conv1.feature_space().layer == "conv1" and conv1.feature_space().pooling == "avg"
    assert conv1.feature_space().digest != base.feature_space().digest
    x = batch()
    with torch.inference_mode():
        expected = base.module.conv1(x).mean((2, 3))
    torch.testing.assert_close(feats(conv1, x), expected)
    assert load_backbone(TINY, layer="conv1").pooling == "avg"  # the default pooling for a layer
    maxed = load_backbone(TINY, layer="conv1", pooling="max")
    assert maxed.feature_space().digest != conv1.feature_space().digest
    assert torch.all(feats(maxed, x) >= feats(conv1, x))
    assert load_backbone(TINY, layer="conv2", pooling="flatten").dim == 32 * 8 * 8
    # The hook stops the forward pass at the layer and is removed afterwards.
    assert not conv1.module.conv1._forward_hooks
    assert feats(base, x).shape == (3, 32)


def test_bad_layer_and_pooling_are_clear_errors():
    with pytest.raises(ProbeError, match=r"no layer 'conv'.*did you mean .*conv1") as info:
        load_backbone(TINY, layer="conv")
    assert "conv2" in str(info.value)
    with pytest.raises(ProbeError, match="'mean' is not one of"):
        load_backbone(TINY, pooling="mean")
    with pytest.raises(ProbeError, match="choose a pooling"):
        load_backbone(TINY, layer="conv1", pooling="none")
    with pytest.raises(ProbeError, match="'cls' needs"):
        load_backbone(TINY, layer="conv1", pooling="cls")


def test_unknown_backbone_names_get_suggestions():
    with pytest.raises(BackboneNotFoundError) as info:
        load_backbone("test:tiny-cn")
    assert "did you mean test:tiny-cnn" in str(info.value)
    assert isinstance(info.value, KeyError)
    assert not str(info.value).startswith('"')  # a message, not a KeyError repr
    with pytest.raises(BackboneNotFoundError, match=r"did you mean .*tv:resnet18"):
        get_spec("tv:resnet1")
    with pytest.raises(BackboneNotFoundError, match="probe backbones"):
        get_spec("zzzzzzzz")


def test_registry_lists_builtins_and_torchvision():
    names = backbone_names()
    assert names[:2] == [DEFAULT_BACKBONE, TINY]
    assert "tv:resnet18" in names and "tv:vit_b_16" in names
    assert backbone_names(include_tv=False) == [DEFAULT_BACKBONE, TINY]
    assert get_spec(TINY).test_only and get_spec(TINY).dim() == 32
    assert get_spec("tv:resnet18").dim() == 512


# -- weight files --------------------------------------------------------------------------------------------


def test_weights_file_digest_is_the_file_sha256(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(TinyCNN(seed=1).state_dict(), path)
    bb = load_backbone(TINY, weights=path)
    assert bb.weights_sha256 == sha256_of(path)
    assert bb.weights_path == str(path)
    default = load_backbone(TINY)
    assert bb.feature_space().digest != default.feature_space().digest
    x = batch()
    assert not torch.allclose(feats(bb, x), feats(default, x))
    # {"state_dict": ...} checkpoints are accepted too.
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": TinyCNN(seed=1).state_dict(), "epoch": 3}, wrapped)
    torch.testing.assert_close(feats(load_backbone(TINY, weights=wrapped), x), feats(bb, x))


def test_unusable_weights_files_are_clear_errors(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_backbone(TINY, weights=tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(WeightsUnavailableError, match="not a loadable state_dict"):
        load_backbone(TINY, weights=garbage)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(WeightsUnavailableError, match="not a state_dict"):
        load_backbone(TINY, weights=tensor)
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv1.weight": torch.zeros(2)}, wrong)
    with pytest.raises(WeightsUnavailableError, match="does not fit") as info:
        load_backbone(TINY, weights=wrong)
    assert "\n" not in str(info.value)


def test_torchvision_random_init_and_local_weights_file(tmp_path):
    from torchvision import models

    rand = load_backbone("tv:resnet18", weights="random")
    assert rand.dim == 512 and rand.weights_sha256.startswith("random-init-seed0-")
    assert rand.preprocess.crop == 224 and rand.preprocess.resize == 256
    assert rand.channels_last

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = models.get_model("resnet18", weights=None)  # the same seeded init, as a full torchvision model
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    local = load_backbone("tv:resnet18", weights=path)
    assert local.weights_sha256 == sha256_of(path)
    assert local.feature_space().digest != rand.feature_space().digest
    x = batch(2, 64)
    torch.testing.assert_close(feats(local, x), feats(rand, x))

    # A state_dict of another architecture is refused with a message, not a traceback.
    with pytest.raises(WeightsUnavailableError, match="does not fit the architecture"):
        load_backbone("tv:resnet18", weights=_tiny_weights(tmp_path))


def _tiny_weights(tmp_path):
    path = tmp_path / "tiny-for-resnet.pt"
    torch.save(TinyCNN().state_dict(), path)
    return path


def test_default_backbone_loads_offline_when_installed():
    spec = get_spec(DEFAULT_BACKBONE)
    if spec.weights_status() != "available":
        pytest.skip("efficientnet-lite0 weights package not installed")
    bb = load_backbone()
    assert bb.name == DEFAULT_BACKBONE and bb.dim == 1280 == spec.dim()
    assert bb.weights_sha256 == sha256_of(bb.weights_path)
    assert bb.preprocess.crop == 224


# -- user-registered backbones (docs/backbones.md) ------------------------------------------------------------


@pytest.fixture
def clean_registry():
    from probe import backbones

    before = dict(backbones._REGISTRY)
    yield
    backbones._REGISTRY.clear()
    backbones._REGISTRY.update(before)


def _doc_blocks(name: str, lang: str = "python") -> list[str]:
    import re

    return re.findall(rf"```{lang}\n(.*?)```", (REPO_ROOT / "docs" / name).read_text(), flags=re.S)


def test_documented_user_backbone_extracts_fits_and_predicts(tmp_path, monkeypatch, clean_registry):
    import numpy as np

    from conftest import make_image, make_image_folder

    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "data" / "train", per_class=6)
    make_image(tmp_path / "a.jpg", seed=5, color=(220, 40, 40))
    register_block, use_block = _doc_blocks("backbones.md")[:2]
    namespace: dict = {}
    exec(compile(register_block, "docs/backbones.md", "exec"), namespace)
    exec(compile(use_block, "docs/backbones.md", "exec"), namespace)
    fs, res = namespace["fs"], namespace["res"]
    assert fs.space.backbone == "my:embedder" and fs.features.shape == (18, 8)
    assert fs.space.weights_sha256 == sha256_of(tmp_path / "embedder.pt")
    assert np.isfinite(fs.features).all() and fs.features.std() > 0
    assert res.metrics["inputs_cached"] == 18  # the extract above filled the cache
    model = namespace["probe"].load("model.probe")
    assert model.backbone_["name"] == "my:embedder"
    assert list(model.predict([str(tmp_path / "a.jpg")])) == ["cat"]
    assert "my:embedder" in backbone_names(include_tv=False)


def test_entry_point_plugin_reaches_the_command_line(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import make_image_folder, subprocess_env

    site = tmp_path / "site"
    (site / "probe_plugin_demo-0.1.dist-info").mkdir(parents=True)
    (site / "probe_plugin_demo-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: probe-plugin-demo\nVersion: 0.1\n")
    (site / "probe_plugin_demo-0.1.dist-info" / "entry_points.txt").write_text(
        '[probe.backbones]\n"demo:tiny" = probe_plugin_demo\n')
    (site / "probe_plugin_demo.py").write_text(
        "from probe.backbones import TinyCNN, register, state_sha256\n"
        "from probe.preprocess import Preprocess\n\n"
        "@register('demo:tiny', description='plugin demo', dim=32)\n"
        "def build(weights):\n"
        "    net = TinyCNN(seed=7)\n"
        "    return net, Preprocess(resize=32, crop=32), state_sha256(net), None\n")
    env = subprocess_env()
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    run = lambda *a: subprocess.run([sys.executable, "-m", "probe.cli", *map(str, a)], capture_output=True,  # noqa
                                    text=True, env=env, cwd=REPO_ROOT, timeout=120)
    listed = run("backbones", "--json")
    assert listed.returncode == 0, listed.stderr
    row = next(r for r in json.loads(listed.stdout) if r["name"] == "demo:tiny")
    assert row["dim"] == 32 and row["description"] == "plugin demo"
    folder = make_image_folder(tmp_path / "imgs", per_class=2)
    out = run("extract", folder, "-b", "demo:tiny", "--cache", tmp_path / "cache", "--device", "cpu",
              "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "(demo:tiny, 32-d)" in out.stdout and "6 new" in out.stdout


def test_register_refuses_bad_names_and_silent_replacement(clean_registry):
    from probe.backbones import TinyCNN, register, state_sha256

    def build(weights):
        net = TinyCNN(seed=3)
        return net, Preprocess(resize=32, crop=32), state_sha256(net), None

    for bad in ("tv:resnet18", "", "a b", "../x"):
        with pytest.raises(ProbeError, match="backbone name"):
            register(bad)(build)
    with pytest.raises(ProbeError, match="already registered"):
        register(TINY)(build)
    register("mine:tiny", dim=32)(build)
    bb = load_backbone("mine:tiny")
    assert bb.dim == 32 and bb.weights_sha256 != load_backbone(TINY).weights_sha256
