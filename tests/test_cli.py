"""The command line: every --help works, expected failures are one-line messages, extract end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest

from conftest import REPO_ROOT, TINY, invoke, run_probe, subprocess_env
from probe.cache import FeatureCache
from probe.cli import cli


CPU_ARGS = ("--device", "cpu", "--workers", 0, "--no-progress")


def command_paths(group: click.Group, prefix=()):
    """Every command of the group, recursively, as argv prefixes: (), ("extract",), ("cache", "info"), ..."""
    yield prefix
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if isinstance(cmd, click.Group):
            yield from command_paths(cmd, (*prefix, name))
        else:
            yield (*prefix, name)


def test_help_of_every_command():
    paths = list(command_paths(cli))
    assert {("extract",), ("backbones",), ("cache",), ("cache", "info"), ("cache", "verify"),
            ("cache", "compact"), ("cache", "ls"), ("cache", "rm")} <= set(paths)
    for path in paths:
        result = invoke(*path, "--help")
        assert result.output.startswith("Usage: "), path
        assert "Traceback" not in result.output
    assert "--weights" in invoke("extract", "--help").output
    assert invoke("--version").output.strip().endswith("0.1.0")


def test_help_in_a_fresh_interpreter_and_the_cli_py_shim():
    proc = subprocess.run([sys.executable, "cli.py", "--help"], capture_output=True, text=True, timeout=120,
                          env=subprocess_env(), cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "extract" in proc.stdout and "cache" in proc.stdout


def test_torchvision_without_weights_is_a_one_line_error(tmp_path, image_folder):
    env = subprocess_env(TORCH_HOME=tmp_path / "torch-home",  # no weights here, whatever this machine has
                         https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")  # a download fails fast
    for var in ("no_proxy", "NO_PROXY"):
        env.pop(var, None)
    proc = run_probe("extract", image_folder, "-b", "tv:resnet18", "--cache", tmp_path / "cache", env=env)
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr
    assert "tv:resnet18" in errors[0] and "--weights" in errors[0]
    assert not (tmp_path / "cache" / "spaces").exists()


def test_unknown_backbone_suggests_close_names(image_folder, cache_dir):
    result = invoke("extract", image_folder, "-b", "test:tiny", "--cache", cache_dir, expect=1)
    assert "Error: unknown backbone 'test:tiny'" in result.output
    assert "did you mean test:tiny-cnn" in result.output
    assert "Traceback" not in result.output


def test_missing_input_names_it(tmp_path, cache_dir):
    result = invoke("extract", tmp_path / "nope", "-b", TINY, "--cache", cache_dir, expect=1)
    assert f"Error: {tmp_path / 'nope'}: no such file or folder" in result.output


def test_bad_option_values_are_usage_errors(image_folder):
    assert invoke("extract", image_folder, "--batch-size", 0, expect=2).exit_code == 2
    assert invoke("extract", image_folder, "--pooling", "median", expect=2).exit_code == 2
    assert invoke("extract", expect=2).exit_code == 2


def test_extract_then_rerun(image_folder, cache_dir):
    args = ("extract", image_folder, "-b", TINY, "--cache", cache_dir, "--batch-size", 8, *CPU_ARGS)
    first = invoke(*args)
    (store,) = FeatureCache(cache_dir).stores()
    assert f"space {store.space.id} ({TINY}, 32-d)" in first.output
    assert "24 inputs (24 unique): 24 new, 0 cached, 0 failed" in first.output
    again = invoke(*args)
    assert "24 inputs (24 unique): 0 new, 24 cached, 0 failed" in again.output
    report = json.loads((cache_dir / "last-extract.json").read_text())
    assert report["stats"]["model_batches"] == 0 and report["stats"]["files_hashed"] == 0
    assert len(store) == 24
    store.close()


def test_layer_option_makes_a_second_space(image_folder, cache_dir):
    common = ("-b", TINY, "--cache", cache_dir, "--batch-size", 8, *CPU_ARGS)
    invoke("extract", image_folder, *common)
    result = invoke("extract", image_folder, *common, "--layer", "conv1", "--pooling", "avg", "--dtype", "float16")
    assert "(test:tiny-cnn, 16-d)" in result.output
    spaces = {s.space.layer: s for s in FeatureCache(cache_dir).stores()}
    assert set(spaces) == {"penultimate", "conv1"}
    assert spaces["conv1"].space.dim == 16 and spaces["conv1"].space.dtype == "float16"
    assert len(spaces["conv1"]) == 24
    info = invoke("cache", "info", "--cache", cache_dir).output
    assert spaces["conv1"].space.id in info and spaces["penultimate"].space.id in info
    for s in spaces.values():
        s.close()
    result = invoke("extract", image_folder, *common, "--layer", "conv", expect=1)
    assert "did you mean" in result.output and "conv1" in result.output


def test_backbones_lists_the_test_backbone():
    out = invoke("backbones").output
    line = next(line for line in out.splitlines() if line.startswith(TINY))
    assert "32-d" in line and "TEST ONLY" in line
    assert any(line.startswith("tv:resnet18") and "512-d" in line for line in out.splitlines())


@pytest.mark.parametrize("args", [("cache", "info"), ("cache", "verify"), ("cache", "compact")])
def test_cache_commands_on_an_empty_cache(args, tmp_path):
    invoke(*args, "--cache", tmp_path / "none")


def test_listings_have_json(image_folder, cache_dir):
    rows = json.loads(invoke("backbones", "--json").output)
    tiny = next(r for r in rows if r["name"] == TINY)
    assert tiny["dim"] == 32 and tiny["test_only"] is True
    assert any(r["name"] == "tv:resnet18" and r["dim"] == 512 for r in rows)
    invoke("extract", image_folder, "-b", TINY, "--cache", cache_dir, "--batch-size", 8, *CPU_ARGS)
    (info,) = json.loads(invoke("cache", "info", "--cache", cache_dir, "--json").output)
    assert info["rows"] == 24 and info["space"]["backbone"] == TINY and info["segments"] == 1
    assert info["digest"].startswith(info["id"]) and info["bytes"] > 0
    listed = json.loads(invoke("cache", "ls", info["id"], "--cache", cache_dir, "--json", "--limit", 5).output)
    assert listed["space"] == info["space"] and listed["rows"] == 24 and len(listed["keys"]) == 5
    plain = invoke("cache", "ls", info["id"], "--cache", cache_dir, "--limit", 3).output.splitlines()
    assert plain[-3:] == listed["keys"][:3]  # plain output: description first, then one key per line
    assert json.loads(invoke("cache", "info", "--cache", cache_dir / "none", "--json").output) == []
