"""The README's examples stay true: every `probe ...` line parses with the real CLI (commands and options exist,
values are accepted), every Python block compiles and names only real API, and the docs it links exist."""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import click
import pytest

from probe.cli import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    """The fenced code blocks of the README whose info string is ``lang`` ("" for untagged blocks)."""
    blocks, current, info = [], None, ""
    for line in README.splitlines():
        if line.startswith("```"):
            if current is None:
                current, info = [], line[3:].strip()
            else:
                if info == lang:
                    blocks.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def _probe_lines() -> list[list[str]]:
    out = []
    for block in _blocks(""):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if "probe " not in line or line.startswith("make"):
                continue
            argv = shlex.split(line.split("| ", 1)[-1])  # `find ... | probe predict ...`
            out.append(argv[argv.index("probe") + 1:])
    return out


@pytest.mark.parametrize("argv", _probe_lines(), ids=lambda a: " ".join(a)[:60])
def test_readme_command_lines_parse(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for a in argv:  # model arguments must exist to parse
        if a.endswith(".probe") and argv[0] in ("evaluate", "predict"):
            (tmp_path / a).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / a).touch()
    ctx = cli.make_context("probe", list(argv), resilient_parsing=False)
    with ctx:  # make_context raises on an unknown option or a bad value: that is the check
        group_ctx, args, path = ctx, list(ctx.protected_args) + list(ctx.args), []
        while isinstance(group_ctx.command, click.Group):
            name, cmd, rest = group_ctx.command.resolve_command(group_ctx, args)
            group_ctx = cmd.make_context(name, rest, parent=group_ctx)
            args = list(getattr(group_ctx, "protected_args", [])) + list(group_ctx.args)
            path.append(name)
        assert path == argv[:len(path)] and not isinstance(group_ctx.command, click.Group)


def test_readme_lists_real_commands():
    assert len(_probe_lines()) >= 10
    used = {argv[0] for argv in _probe_lines()}
    assert used >= {"extract", "fit", "evaluate", "predict", "cache", "backbones"}


@pytest.mark.parametrize("block", _blocks("python"), ids=lambda b: b.split("\n")[0][:40])
def test_readme_python_blocks_use_real_api(block):
    tree = ast.parse(block)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("probe", "sklearn"):
            mod = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(mod, alias.name), f"{node.module}.{alias.name}"
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "probe":
            import probe

            assert hasattr(probe, node.attr), f"probe.{node.attr}"


def test_linked_docs_exist():
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target


def test_two_commands_near_the_top():
    head = README[: README.index("## What it does")]
    assert "make demo" in head and "make test" in head
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_demo_pixel_baseline_runs(tmp_path):
    """`make demo`'s context step (logistic regression on raw pixels) runs against today's API."""
    import subprocess
    import sys

    from conftest import make_image_folder, subprocess_env

    train = make_image_folder(tmp_path / "train", per_class=6, size=(16, 16))
    test = make_image_folder(tmp_path / "test", per_class=3, size=(16, 16), seed=500)
    proc = subprocess.run([sys.executable, str(ROOT / "demo" / "pixel_baseline.py"), str(train), str(test)],
                          capture_output=True, text=True, timeout=120, env=subprocess_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "pixel logistic regression: test accuracy" in proc.stdout
    syntax = subprocess.run(["bash", "-n", str(ROOT / "demo" / "run.sh")], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
