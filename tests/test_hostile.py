"""probe against an attacker: damaged caches, concurrent maintenance, non-regular inputs, zip bombs, destructive
output paths, read-only caches and inputs that used to end in a traceback.

Each test plays one attack from the adversarial review and asserts what probe must do instead: never serve a
damaged or non-finite row, never lose a row to a concurrent compaction, never hang on a FIFO, never inflate a
bomb, never replace what is not its own, and always end an expected failure in one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import time
import tracemalloc
import traceback
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

import probe
from conftest import REPO_ROOT, TINY, invoke, make_image, make_image_folder, probe_command, run_probe, subprocess_env
from probe.cache import FeatureCache
from probe.engine import Extractor
from probe.errors import CacheMismatchError, ProbeError
from probe.manifest import MANIFEST, ModelFormatError
from probe.model import load
from probe.sources import resolve

CPU = dict(device="cpu", workers=0, progress=False, batch_size=4)
CPU_ARGS = ("--device", "cpu", "--workers", 0, "--no-progress", "--batch-size", 4)


def tiny(cache, **kw) -> Extractor:
    return Extractor(TINY, cache, **{**CPU, **kw})


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging forever) when the block runs longer than ``seconds`` (SIGALRM, main thread)."""
    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s: probe hangs")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def cli(*args, stdin: str | None = None, seconds: int = 120) -> subprocess.CompletedProcess:
    """Run the CLI in this process (CliRunner, stdout and stderr apart), bounded by a deadline; an exception that
    escapes the CLI is written to stderr as the traceback a user would see."""
    from click.testing import CliRunner

    from probe.cli import cli as probe_cli

    with deadline(seconds):
        r = CliRunner().invoke(probe_cli, [str(a) for a in args], input=stdin)
    err = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        err += "Traceback (most recent call last):\n" + "".join(traceback.format_exception(r.exception))
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, err)


def one_line_error(proc: subprocess.CompletedProcess, code: int = 1) -> str:
    """The single `Error: ...` line of a failed run (asserting there is exactly one and no traceback)."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}\n{out}"
    assert "Traceback" not in out, out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def flip_feature_bytes(segment: Path, n: int = 16, offset_rows: int = 0, value: float | None = None) -> None:
    """Damage a segment on disk like bit rot: flip ``n`` bytes inside its features (or write ``value``)."""
    with h5py.File(segment, "r") as f:
        offset = f["features"].id.get_offset()
        row_bytes = f["features"].shape[1] * f["features"].dtype.itemsize
    with open(segment, "r+b") as fh:
        fh.seek(offset + offset_rows * row_bytes)
        if value is None:
            data = bytearray(fh.read(n))
            fh.seek(offset + offset_rows * row_bytes)
            fh.write(bytes(b ^ 0x5A for b in data))
        else:
            fh.write(np.full(row_bytes // 4, value, np.float32).tobytes())


@pytest.fixture
def filled(tmp_path):
    """A folder of 12 images extracted into a cache in 3 segments of 4 rows, and the clean features."""
    folder = make_image_folder(tmp_path / "imgs", per_class=4)
    cache = tmp_path / "cache"
    fs = tiny(cache, segment_rows=4).extract(resolve(folder))
    (store,) = FeatureCache(cache).stores()
    segments = store.segment_files()
    store.close()
    assert len(segments) == 3
    return folder, cache, dict(zip(fs.keys, fs.features)), segments


# -- 1. reads verify checksums ---------------------------------------------------------------------------------


def test_flipped_bytes_are_never_served_and_are_re_extracted(filled, caplog):
    folder, cache, clean, segments = filled
    flip_feature_bytes(segments[1])
    ex = tiny(cache)
    fs = ex.extract(resolve(folder))
    assert fs.stats.new == 4 and fs.stats.cached == 8  # the damaged segment's rows were extracted again
    assert any(segments[1].name in r.message and "damaged" in r.message for r in caplog.records)
    for k, f in zip(fs.keys, fs.features):
        np.testing.assert_array_equal(f, clean[k])
    # A reader that never writes is not served the damaged rows either.
    again = tiny(cache, write=False).extract(resolve(folder))
    assert again.stats.new == 0
    for k, f in zip(again.keys, again.features):
        np.testing.assert_array_equal(f, clean[k])


def test_fit_never_trains_on_a_damaged_row(filled, tmp_path):
    folder, cache, clean, segments = filled
    flip_feature_bytes(segments[0], value=1e30)
    res = probe.fit(folder, backbone=TINY, cache=cache, value=1.0, val_split=0, **CPU)
    assert res.metrics["inputs_extracted"] == 4  # damaged rows were treated as missing
    reference = probe.fit(folder, backbone=TINY, cache=tmp_path / "clean", value=1.0, val_split=0, **CPU)
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    np.testing.assert_allclose(res.model.predict_proba(paths), reference.model.predict_proba(paths), atol=1e-6)


def test_nan_features_are_not_cached_not_served_and_do_not_crash_fit(filled):
    folder, cache, clean, segments = filled
    flip_feature_bytes(segments[2], value=float("nan"))
    store = FeatureCache(cache).stores()[0]
    keys = [k.decode() for k in h5py.File(segments[2], "r")["keys"][...]]
    assert store.missing(keys) == keys  # non-finite rows do not count as cached
    store.close()
    res = probe.fit(folder, backbone=TINY, cache=cache, value=1.0, val_split=0, **CPU)
    assert res.metrics["inputs_extracted"] == 4 and res.metrics["accuracy"] > 0.5


def test_compact_never_re_blesses_a_damaged_row(filled):
    folder, cache, clean, segments = filled
    flip_feature_bytes(segments[1])
    invoke("cache", "compact", "--cache", cache)
    (store,) = FeatureCache(cache).stores()
    assert segments[1].exists()  # left in place: not merged, not deleted
    report = store.verify()
    assert not report.ok and any(segments[1].name in p and "checksum" in p for p in report.problems)
    store.ensure_verified()
    assert len(store) == 8  # the merged segment holds only the 8 verified rows
    store.close()
    fs = tiny(cache).extract(resolve(folder))
    assert fs.stats.new == 4
    for k, f in zip(fs.keys, fs.features):
        np.testing.assert_array_equal(f, clean[k])


def test_verify_repair_quarantines_and_the_next_run_refills(filled):
    folder, cache, clean, segments = filled
    flip_feature_bytes(segments[0])
    out = invoke("cache", "verify", "--cache", cache, expect=1).output
    assert "checksum" in out and "--repair" in out
    out = invoke("cache", "verify", "--repair", "--cache", cache).output
    assert "quarantined" in out and not segments[0].exists()
    assert (segments[0].parent.parent / "quarantine" / segments[0].name).exists()
    assert "ok" in invoke("cache", "verify", "--cache", cache).output
    fs = tiny(cache).extract(resolve(folder))
    assert fs.stats.new == 4
    assert invoke("cache", "verify", "--cache", cache).exit_code == 0


def test_truncated_segment_is_reported_not_silently_recomputed(filled, tmp_path, caplog):
    folder, cache, clean, segments = filled
    data = segments[2].read_bytes()
    segments[2].write_bytes(data[: len(data) // 3])
    model = probe.fit(folder, backbone=TINY, cache=tmp_path / "other", value=1.0, val_split=0, **CPU).model
    caplog.clear()
    res = probe.predict(model, folder, cache=cache, **{k: v for k, v in CPU.items()})
    assert not res.errors and len(res.rows) == 12
    assert any(segments[2].name in r.message and "damaged" in r.message for r in caplog.records)


def test_a_mismatched_cache_is_refused_by_readers_too(filled, tmp_path):
    folder, cache, clean, segments = filled
    other = tiny(cache, layer="conv1")  # another space in the same cache
    shutil.copy(segments[0], other.store.segments_dir / segments[0].name)
    with pytest.raises(CacheMismatchError):
        tiny(cache, layer="conv1", write=False).extract(resolve(folder))


# -- 2. compaction vs concurrent writers and readers ----------------------------------------------------------


def test_compaction_loop_against_a_concurrent_extraction_loses_no_row(tmp_path):
    n = 90
    folder = make_image_folder(tmp_path / "many", per_class=n // 3)
    cache = tmp_path / "cache"
    tiny(cache).extract(resolve(folder)[:2])  # the space exists before the race starts
    proc = subprocess.Popen(
        probe_command("extract", folder, "-b", TINY, "--cache", cache, "--segment-rows", 2, *CPU_ARGS),
        env=subprocess_env(), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    compactions = 0
    try:
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline:
            for store in FeatureCache(cache).stores():
                store.compact()
                store.close()
            compactions += 1
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert compactions >= 2
    (store,) = FeatureCache(cache).stores()
    assert len(store) == n and store.verify().ok
    store.close()
    again = tiny(cache).extract(resolve(folder))
    assert again.stats.new == 0 and again.stats.cached == n  # nothing was lost


def test_lazy_reader_survives_a_compaction_in_another_process(filled):
    folder, cache, clean, segments = filled
    fs = probe.extract(folder, TINY, cache=cache, **CPU)  # features not loaded yet: segments not opened
    proc = run_probe("cache", "compact", "--cache", cache)  # another process
    assert proc.returncode == 0, proc.stderr
    assert all(not s.exists() for s in segments)
    for k, f in zip(fs.keys, fs.features):  # the vanished segments are re-listed, not an h5py error
        np.testing.assert_array_equal(f, clean[k])


def test_compact_waits_for_a_running_extraction_or_fails_fast(filled):
    folder, cache, clean, segments = filled
    (store,) = FeatureCache(cache).stores()
    with store.lock():  # an extraction holding the space
        proc = cli("cache", "compact", "--no-wait", "--cache", cache)  # flock: a second open file conflicts too
        assert "in use by another probe process" in one_line_error(proc)
        rm = cli("cache", "rm", store.space.id, "--no-wait", "--cache", cache)
        one_line_error(rm)
    assert all(s.exists() for s in segments) and store.path.exists()
    store.close()


# -- 3/4. inputs that are not regular files ------------------------------------------------------------------


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("where", ["folder", "csv", "argument", "symlink", "device"])
def test_non_regular_inputs_are_reported_with_their_kind_and_never_hang(tmp_path, where):
    folder = make_image_folder(tmp_path / "imgs", per_class=2)
    if where == "folder":
        bad, kind, inputs = _fifo(folder / "cat" / "pipe.png"), "fifo", [folder]
    elif where == "csv":
        bad, kind = _fifo(tmp_path / "pipe.jpg"), "fifo"
        (tmp_path / "list.csv").write_text(f"{folder / 'cat' / 'cat_000.png'},cat\n{bad},dog\n")
        inputs = [tmp_path / "list.csv"]
    elif where == "argument":
        bad, kind, inputs = _fifo(tmp_path / "pipe.png"), "fifo", [folder, tmp_path / "pipe.png"]
    elif where == "symlink":
        bad = tmp_path / "zero.png"
        bad.symlink_to("/dev/zero")
        kind, inputs = "device", [folder, bad]
    else:
        bad, kind, inputs = Path("/dev/zero"), "device", [folder, "/dev/zero"]
    proc = cli("extract", *inputs, "-b", TINY, "--cache", tmp_path / "cache", *CPU_ARGS)
    assert proc.returncode == 0, proc.stderr
    failed = [line for line in proc.stdout.splitlines() if "failed:" in line]
    assert len(failed) == 1 and str(bad) in failed[0] and kind in failed[0], proc.stdout
    # predict too: an error row for the FIFO, predictions for the rest
    model = probe.fit(folder, backbone=TINY, cache=tmp_path / "cache", value=1.0, val_split=0, **CPU)
    model.model.save(tmp_path / "m.probe")
    proc = cli("predict", tmp_path / "m.probe", *inputs, "--format", "jsonl", *CPU_ARGS)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    errors = [r for r in rows if r["error"]]
    assert len(errors) == 1 and kind in errors[0]["error"]


# -- 5. model files ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-model")
    folder = make_image_folder(root / "imgs", per_class=3)
    res = probe.fit(folder, backbone=TINY, cache=root / "cache", value=1.0, val_split=0, output=root / "m.probe", **CPU)
    return res.path


def _rewrite(src: Path, dst: Path, manifest=None, members: dict | None = None, drop=()) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for name in zin.namelist():
            if name in drop or name in (members or {}):
                continue
            data = zin.read(name)
            if name == MANIFEST and manifest is not None:
                m = json.loads(data)
                manifest(m)
                data = json.dumps(m).encode()
            zout.writestr(name, data)
        for name, data in (members or {}).items():
            zout.writestr(name, data)
    return dst


def _bomb(src: Path, dst: Path, member: str, mib: int) -> Path:
    """``src`` with ``member`` replaced by ``mib`` MiB of zeros (deflate shrinks that ~1000x)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for name in zin.namelist():
            if name != member:
                zout.writestr(name, zin.read(name))
        with zout.open(member, "w", force_zip64=True) as w:
            chunk = bytes(16 << 20)
            for _ in range(mib // 16):
                w.write(chunk)
    return dst


@pytest.mark.parametrize("member, mib", [("head.skops", 1040), (MANIFEST, 64)])
def test_zip_bomb_is_refused_fast_with_bounded_memory(model_file, tmp_path, member, mib):
    bomb = _bomb(model_file, tmp_path / "bomb.probe", member, mib)
    assert bomb.stat().st_size < 4 << 20
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(ModelFormatError, match=f"{member}.*over the limit"):
        load(bomb)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 32 << 20, f"peak {peak} bytes while refusing the bomb"
    assert seconds < 5  # generous: no member data is inflated at all


def test_a_member_lying_about_its_size_is_refused(model_file, tmp_path):
    lying = tmp_path / "lying.probe"
    shutil.copy(model_file, lying)
    with zipfile.ZipFile(lying) as z:
        info = z.getinfo("train-keys.txt")
    data = bytearray(lying.read_bytes())
    # Halve the declared uncompressed size in the central directory record: zipfile stops reading there and the
    # CRC check fails; nothing beyond the declared size is ever inflated.
    name = b"train-keys.txt"
    pos = data.find(b"PK\x01\x02")
    while pos != -1:
        n = int.from_bytes(data[pos + 28:pos + 30], "little")
        if data[pos + 46:pos + 46 + n] == name:
            data[pos + 24:pos + 28] = max(1, info.file_size // 2).to_bytes(4, "little")
            break
        pos = data.find(b"PK\x01\x02", pos + 4)
    assert pos != -1
    lying.write_bytes(bytes(data))
    with pytest.raises(ProbeError):
        load(lying)


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.pop("classes"), "classes"),
    (lambda m: m["backbone"].update(dim="x"), "backbone.dim"),
    (lambda m: m["backbone"].pop("space_digest"), "backbone.space_digest"),
    (lambda m: m.update(head_file="nothing.skops"), "head_file"),
    (lambda m: m.update(head_file="head.joblib"), "head_file"),
    (lambda m: m["backbone"]["preprocess"].update(mean=[0.5]), "backbone.preprocess.mean"),
    (lambda m: m.update(versions={"sklearn": 1}), "versions.sklearn"),
    (lambda m: m.update(backbone=[]), "backbone"),
])
def test_malformed_manifest_fields_are_named_in_one_line(model_file, tmp_path, edit, field):
    bad = _rewrite(model_file, tmp_path / "bad.probe", manifest=edit)
    with pytest.raises(ModelFormatError, match=f"'{field}'"):
        load(bad)
    out = tmp_path / "out"
    make_image(out / "a.png", seed=1)
    error = one_line_error(cli("predict", bad, out / "a.png"))
    assert field in error


def test_train_keys_must_be_keys(model_file, tmp_path):
    bad = _rewrite(model_file, tmp_path / "bad.probe", members={"train-keys.txt": b"../../etc/passwd\n"})
    with pytest.raises(ModelFormatError, match="train-keys.txt"):
        load(bad)


# -- 6. destructive paths ------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["symlink", "fifo", "device", "folder"])
def test_output_targets_that_are_not_regular_files_are_left_alone(model_file, tmp_path, target):
    img = make_image(tmp_path / "in" / "a.png", seed=3)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    if target == "symlink":
        out = tmp_path / "link.csv"
        out.symlink_to(victim)
    elif target == "fifo":
        out = _fifo(tmp_path / "out.fifo")
    elif target == "device":
        out = Path("/dev/null")
    else:
        out = tmp_path / "adir"
        out.mkdir()
    before = os.lstat(out)
    proc = cli("predict", model_file, img, "-o", out, *CPU_ARGS)
    if target == "folder":  # click's own check of the option: a usage error (exit 2)
        assert str(out) in one_line_error(proc, code=2)
    else:
        error = one_line_error(proc)
        assert str(out) in error and "refusing" in error
    after = os.lstat(out)
    assert stat.S_IFMT(after.st_mode) == stat.S_IFMT(before.st_mode) and after.st_ino == before.st_ino
    assert victim.read_text() == "precious\n"
    if target == "symlink":  # fit -o onto a symlink is refused the same way
        folder = make_image_folder(tmp_path / "imgs", per_class=2)
        one_line_error(cli("fit", folder, "-b", TINY, "--C", 1, "--val-split", 0, "--cache", tmp_path / "c",
                           "-o", out, *CPU_ARGS))
        assert out.is_symlink() and victim.read_text() == "precious\n"


def test_cache_rm_accepts_only_space_ids_under_the_cache(filled, tmp_path):
    folder, cache, clean, segments = filled
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "space.json").write_text("{}")
    for bad in ("../../victim", "../victim", str(victim), "..", "*", ""):
        proc = cli("cache", "rm", bad, "--cache", cache)
        assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr
    assert victim.exists() and (victim / "space.json").exists()
    (store,) = FeatureCache(cache).stores()
    assert len(store) == 12
    store.close()


# -- 7. read-only caches -------------------------------------------------------------------------------------


def run_read_only(folder: Path, *args, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run the CLI with ``folder`` read-only: a read-only bind mount in a private user + mount namespace when
    running as root (permissions do not bind root), plain permission bits otherwise."""
    if os.geteuid() != 0:
        mode = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
        for p in mode:
            p.chmod(mode[p] & ~0o222)
        try:
            return run_probe(*args, timeout=timeout)
        finally:
            for p, m in mode.items():
                p.chmod(m)
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to make a read-only mount as root")
    script = ('mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"')
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(folder), *probe_command(*args)],
                          capture_output=True, text=True, timeout=timeout, env=subprocess_env(), cwd=REPO_ROOT)


def test_read_only_cache_serves_fit_predict_evaluate(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=4)
    cache = tmp_path / "cache"
    assert invoke("extract", folder, "-b", TINY, "--cache", cache, *CPU_ARGS).exit_code == 0
    out = tmp_path / "out"
    out.mkdir()
    fit = run_read_only(cache, "fit", folder, "-b", TINY, "--cache", cache, "-o", out / "m.probe", *CPU_ARGS)
    assert fit.returncode == 0, fit.stderr
    assert "12 cached, 0 extracted" in fit.stdout  # every row came from the read-only cache
    pred = run_read_only(cache, "predict", out / "m.probe", folder, "--cache", cache, *CPU_ARGS)
    assert pred.returncode == 0, pred.stderr
    assert len(pred.stdout.splitlines()) == 13 and ",," not in pred.stdout.splitlines()[1]
    ev = run_read_only(cache, "evaluate", out / "m.probe", folder, "--cache", cache, *CPU_ARGS)
    assert ev.returncode == 0 and "accuracy" in ev.stdout, ev.stderr
    # Writing new rows into it fails in one line naming the folder, after nothing was lost.
    new = make_image_folder(tmp_path / "new", per_class=1, seed=900)
    error = one_line_error(run_read_only(cache, "extract", new, "-b", TINY, "--cache", cache, *CPU_ARGS))
    assert "not writable" in error and str(cache) in error
    # ... and so does writing the model into a read-only folder.
    error = one_line_error(run_read_only(out, "fit", folder, "-b", TINY, "--cache", cache, "-o", out / "m2.probe",
                                         *CPU_ARGS))
    assert str(out) in error


# -- 8. one line, never a traceback --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    return make_image_folder(root / "imgs", per_class=3), root


@pytest.mark.parametrize("extra, code, needle", [
    (("--clf", "sklearn.ensemble.RandomForestClassifier", "--params", '{"n_estimators": "x"}'), 1, "n_estimators"),
    (("--C", "-1"), 1, "C=-1"),
    (("--C", "nan"), 1, "C=nan"),
    (("--params", "[1,2]"), 2, "--params"),
    (("--clf", "this.x"), 1, "this.x"),
    (("--clf", "os.system"), 1, "os.system"),
])
def test_bad_head_options_end_in_one_line(labelled, extra, code, needle):
    folder, root = labelled
    proc = cli("fit", folder, "-b", TINY, "--cache", root / "cache", "-o", root / "m.probe", *CPU_ARGS, *extra)
    if code == 2:
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and needle in proc.stderr
    else:
        assert needle in one_line_error(proc)
    assert "Zen of Python" not in proc.stdout + proc.stderr  # `this` was never imported


def test_fit_on_one_image_and_on_one_file_many_times(tmp_path):
    one = make_image(tmp_path / "one" / "cat" / "a.png", seed=1)
    one_line_error(cli("fit", tmp_path / "one", "-b", TINY, "--cache", tmp_path / "c", "-o", tmp_path / "m.probe",
                       *CPU_ARGS))
    table = tmp_path / "same.csv"
    table.write_text("".join(f"{one},{'cat' if i % 2 else 'dog'}\n" for i in range(20_000)))
    error = one_line_error(cli("fit", table, "-b", TINY, "--cache", tmp_path / "c", "-o", tmp_path / "m.probe",
                               *CPU_ARGS))
    assert "distinct" in error


def test_cache_path_under_a_file_is_one_line(tmp_path, labelled):
    folder, _ = labelled
    afile = tmp_path / "afile"
    afile.write_text("x")
    error = one_line_error(cli("extract", folder, "-b", TINY, "--cache", afile / "sub", *CPU_ARGS))
    assert "afile" in error


def test_predict_from_stdin_writes_error_rows_and_goes_on(model_file, tmp_path):
    good = make_image(tmp_path / "a.png", seed=5)
    lines = [str(good), str(tmp_path / "missing.png"), str(tmp_path), "bad\x00name.png", str(good)]
    proc = cli("predict", model_file, "-", "--format", "jsonl", *CPU_ARGS, stdin="\n".join(lines) + "\n")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 5
    assert [r["error"] is None for r in rows] == [True, False, False, False, True]
    assert "directory" in rows[2]["error"]


def test_interrupted_extraction_keeps_finished_segments(tmp_path):
    """A real SIGINT to a running `probe extract`: exit 130, one line, finished segments kept, rerun resumes."""
    n = 300
    folder = make_image_folder(tmp_path / "many", per_class=n // 3)
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        probe_command("extract", folder, "-b", TINY, "--cache", cache, "--segment-rows", 4, "--device", "cpu",
                      "--workers", 0, "--no-progress", "--batch-size", 2),
        env=subprocess_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(cache.glob("spaces/*/segments/seg-*.h5")) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (proc.returncode, err)
    assert "interrupted" in err and "Traceback" not in err
    (store,) = FeatureCache(cache).stores()
    kept = len(store)
    assert 0 < kept < n and store.verify().ok
    store.close()
    fs = tiny(cache).extract(resolve(folder))
    assert fs.stats.cached == kept and fs.stats.new == n - kept


def test_options_are_validated_before_any_side_effect(tmp_path, image_folder):
    cache = tmp_path / "never"
    for bad in (dict(batch_size=0), dict(workers=-1), dict(dtype="float64"), dict(pooling="median"),
                dict(max_pixels=0), dict(segment_rows=0), dict(amp="fp8"), dict(nonsense=1)):
        with pytest.raises(ProbeError):
            probe.extract(image_folder, TINY, cache=cache, **bad)
    assert not cache.exists()
