"""The HDF5 feature cache (probe/cache.py), exercised directly with synthetic features: no torch, no backbone."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import REPO_ROOT, invoke, subprocess_env
from probe.cache import FORMAT, FORMAT_VERSION, FeatureCache, FeatureSpace
from probe.errors import CacheCorruptError, CacheMismatchError, ProbeError
from probe.preprocess import Preprocess

DIM = 4


def make_space(**changes) -> FeatureSpace:
    base = FeatureSpace(
        backbone="test:synthetic",
        weights_sha256="ab" * 32,
        preprocess=Preprocess(resize=32, crop=32).to_dict(),
        layer="penultimate",
        pooling="none",
        dim=DIM,
    )
    return dataclasses.replace(base, **changes)


def key(i) -> str:
    return hashlib.sha256(f"input-{i}".encode()).hexdigest()


def rows(ids, dim: int = DIM) -> np.ndarray:
    """Distinct, recognisable features: row for id i is [i, i + 0.25, i + 0.5, ...]."""
    ids = np.asarray(list(ids), dtype=np.float32)
    return ids[:, None] + np.arange(dim, dtype=np.float32)[None, :] * 0.25


@pytest.fixture
def store(cache_dir):
    s = FeatureCache(cache_dir).open(make_space())
    yield s
    s.close()


def write(store, ids, paths=True):
    ids = list(ids)
    return store.write_segment([key(i) for i in ids], rows(ids), [f"img/{i}.png" for i in ids] if paths else None)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# -- the feature space ---------------------------------------------------------------------------------------


def test_digest_is_sha256_of_canonical_json_and_names_the_directory(cache_dir):
    space = make_space()
    canonical = json.dumps(dataclasses.asdict(space), sort_keys=True, separators=(",", ":"))
    assert space.digest == hashlib.sha256(canonical.encode()).hexdigest()
    assert space.id == space.digest[:16]

    store = FeatureCache(cache_dir).open(space)
    assert store.path == cache_dir / "spaces" / space.id
    assert (store.path / "segments").is_dir()
    assert json.loads((store.path / "space.json").read_text()) == space.to_dict()
    assert FeatureSpace.from_dict(space.to_dict()) == space


@pytest.mark.parametrize(
    "field, value",
    [
        ("backbone", "other"),
        ("weights_sha256", "cd" * 32),
        ("preprocess", Preprocess(resize=36, crop=32).to_dict()),
        ("layer", "conv1"),
        ("pooling", "avg"),
        ("dim", DIM + 1),
        ("dtype", "float16"),
        ("precision", "bfloat16"),
        ("format_version", FORMAT_VERSION + 1),
    ],
)
def test_every_field_is_part_of_the_identity(field, value):
    a, b = make_space(), make_space(**{field: value})
    assert a.digest != b.digest
    assert a.first_difference(b) == field


def test_space_rejects_unknown_dtype_and_unknown_fields():
    with pytest.raises(ValueError, match="float64"):
        make_space(dtype="float64")
    with pytest.raises(CacheCorruptError, match="colour"):
        FeatureSpace.from_dict({**make_space().to_dict(), "colour": "blue"})


# -- opening: identity checks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [("preprocess", Preprocess(resize=36, crop=32).to_dict()), ("weights_sha256", "cd" * 32), ("dtype", "float16")],
)
def test_open_path_with_a_different_space_raises_naming_the_field(cache_dir, field, value):
    written = FeatureCache(cache_dir).open(make_space())
    written.close()
    with pytest.raises(CacheMismatchError) as info:
        FeatureCache(cache_dir).open_path(written.path, expected=make_space(**{field: value}))
    assert info.value.field == field
    assert field in str(info.value)


def test_edited_space_json_is_refused(cache_dir):
    space = make_space()
    store = FeatureCache(cache_dir).open(space)
    d = space.to_dict() | {"layer": "conv1"}
    (store.path / "space.json").write_text(json.dumps(d))
    with pytest.raises(CacheMismatchError) as info:
        FeatureCache(cache_dir).open(space)
    assert info.value.field == "layer"


def test_unreadable_space_json(cache_dir):
    store = FeatureCache(cache_dir).open(make_space())
    (store.path / "space.json").write_text("{not json")
    with pytest.raises(CacheCorruptError):
        FeatureCache(cache_dir).open_path(store.path)
    with pytest.raises(ProbeError, match="not a feature-space directory"):
        FeatureCache(cache_dir).open_path(cache_dir / "nowhere")


def test_open_without_create(cache_dir):
    with pytest.raises(ProbeError, match="no cached features"):
        FeatureCache(cache_dir).open(make_space(), create=False)
    assert not (cache_dir / "spaces").exists()


def test_foreign_segment_is_refused(cache_dir):
    fc = FeatureCache(cache_dir)
    a = fc.open(make_space())
    b = fc.open(make_space(weights_sha256="cd" * 32))
    seg = write(a, range(3))
    write(b, range(10, 12))
    a.close()
    b.close()
    shutil.copy(seg, b.segments_dir / seg.name)

    with pytest.raises(CacheMismatchError) as info:
        fc.open(make_space(weights_sha256="cd" * 32))
    assert info.value.field == "weights_sha256"
    assert seg.name in str(info.value)

    report = fc.open_path(b.path, scan=False).verify()
    assert not report.ok
    assert any("weights_sha256" in p for p in report.problems)
    result = invoke("cache", "verify", "--cache", cache_dir, expect=1)
    assert "FAILED" in result.output and "weights_sha256" in result.output


def test_segment_of_another_format_version_is_refused(store):
    seg = write(store, range(2))
    store.close()
    with h5py.File(seg, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(CacheMismatchError) as info:
        FeatureCache(store.path.parent.parent).open(make_space())
    assert info.value.field == "format_version"


# -- reading -------------------------------------------------------------------------------------------------


def test_get_returns_requested_order_with_repeats_across_segments(store):
    write(store, range(0, 5))
    write(store, range(5, 9))
    write(store, range(9, 12))
    assert len(store.segment_files()) == 3
    assert len(store) == 12
    order = [11, 0, 5, 5, 3, 11, 8, 0, 9]
    got = store.get([key(i) for i in order])
    assert got.dtype == np.float32 and got.shape == (len(order), DIM)
    np.testing.assert_array_equal(got, rows(order))


def test_get_large_segment_dense_and_sparse_reads(cache_dir):
    n = 10_000  # more than one read block (4096 rows)
    store = FeatureCache(cache_dir).open(make_space())
    store.write_segment([key(i) for i in range(n)], rows(range(n)))
    dense = list(range(4000, 4300)) + list(range(100, 50, -1))
    sparse = [9999, 0, 4096, 4095, 7777, 0, 123]
    for order in (dense, sparse, list(reversed(range(n)))):
        np.testing.assert_array_equal(store.get([key(i) for i in order]), rows(order))
    out = np.zeros((2, DIM), np.float32)
    assert store.get([key(1), key(2)], out=out) is out
    np.testing.assert_array_equal(out, rows([1, 2]))
    assert store.get([]).shape == (0, DIM)
    store.close()


def test_lookup_helpers(store):
    write(store, range(3))
    assert key(1) in store and key(7) not in store
    assert sorted(store.keys()) == sorted(key(i) for i in range(3))
    assert store.missing([key(7), key(1), key(8), key(7)]) == [key(7), key(8)]
    with pytest.raises(KeyError, match=key(7)):
        store.get([key(0), key(7)])


def test_first_occurrence_of_a_key_wins_and_duplicates_are_harmless(store):
    write(store, range(3))
    store.write_segment([key(1), key(5)], rows([100, 5]))  # key(1) again, with other values
    assert len(store) == 4
    np.testing.assert_array_equal(store.get([key(1), key(5)]), rows([1, 5]))
    report = store.verify()
    assert report.ok and report.rows == 5 and report.unique_rows == 4
    assert any("duplicate" in n for n in report.notes)


def test_another_store_sees_new_segments_after_refresh(cache_dir):
    fc = FeatureCache(cache_dir)
    reader, writer = fc.open(make_space()), fc.open(make_space())
    write(writer, range(4))
    assert len(reader) == 0
    reader.refresh()
    assert len(reader) == 4
    np.testing.assert_array_equal(reader.get([key(3)]), rows([3]))
    reader.close()
    writer.close()


# -- writing -------------------------------------------------------------------------------------------------


def test_segment_file_is_self_describing(store):
    seg = write(store, range(3))
    assert seg.parent == store.segments_dir and seg.name.startswith("seg-") and seg.suffix == ".h5"
    with h5py.File(seg, "r") as f:
        a = f.attrs
        assert a["format"] == FORMAT == "probe.feature-segment"
        assert int(a["format_version"]) == FORMAT_VERSION
        assert json.loads(a["space"]) == store.space.to_dict()
        assert a["space_digest"] == store.space.digest
        assert int(a["rows"]) == 3
        assert a["created"].endswith("Z")
        feats = f["features"][...]
        assert a["features_sha256"] == hashlib.sha256(feats.tobytes()).hexdigest()
        assert f["keys"].dtype == np.dtype("S64")
        assert [k.decode() for k in f["keys"][...]] == [key(i) for i in range(3)]
        assert feats.dtype == np.float32 and feats.shape == (3, DIM)
        assert list(f["paths"].asstr()[...]) == ["img/0.png", "img/1.png", "img/2.png"]
    assert not list(store.segments_dir.glob(".tmp-*"))


def test_float16_storage(cache_dir):
    space = make_space(dtype="float16")
    store = FeatureCache(cache_dir).open(space)
    values = np.random.default_rng(0).normal(size=(6, DIM)).astype(np.float32)
    seg = store.write_segment([key(i) for i in range(6)], values)
    with h5py.File(seg, "r") as f:
        assert f["features"].dtype == np.float16
    got = store.get([key(i) for i in range(6)])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, values, rtol=1e-3, atol=1e-3)
    assert store.verify().ok
    assert space.digest != make_space().digest
    store.close()


def test_write_refuses_bad_features(cache_dir):
    store = FeatureCache(cache_dir).open(make_space())
    with pytest.raises(ValueError, match="shape"):
        store.write_segment([key(0)], np.zeros((1, DIM + 1), np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        store.write_segment([key(0)], np.full((1, DIM), np.nan, np.float32))
    f16 = FeatureCache(cache_dir).open(make_space(dtype="float16"))
    with pytest.raises(ValueError, match="float16"):  # finite in float32, inf in float16
        f16.write_segment([key(0)], np.full((1, DIM), 1e6, np.float32))
    for s in (store, f16):
        assert s.segment_files() == [] and not list(s.segments_dir.glob(".tmp-*"))
    assert store.write_segment([], np.zeros((0, DIM), np.float32)) is None


def test_failed_write_leaves_no_file(store, monkeypatch):
    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write(store, range(2))
    assert list(store.segments_dir.iterdir()) == []
    assert len(store) == 0


def test_segment_writer_splits_rows_into_segments(store):
    with store.writer(rows_per_segment=3) as w:
        for ids in (range(0, 2), range(2, 7), range(7, 10)):  # batches of 2, 5 and 3 rows
            w.add([key(i) for i in ids], rows(ids))
        assert w.segments_written == 3 and len(store) == 9  # the 10th row is still buffered
    sizes = []
    for p in store.segment_files():
        with h5py.File(p, "r") as f:
            sizes.append(int(f.attrs["rows"]))
    assert sizes == [3, 3, 3, 1]
    assert w.rows_written == 10
    np.testing.assert_array_equal(store.get([key(i) for i in range(10)]), rows(range(10)))
    with pytest.raises(ValueError):
        store.writer(rows_per_segment=0)


def test_segment_writer_flushes_finished_rows_on_error(store):
    with pytest.raises(RuntimeError):
        with store.writer(rows_per_segment=100) as w:
            w.add([key(0), key(1)], rows([0, 1]))
            raise RuntimeError("the run stopped")
    assert sorted(store.keys()) == sorted([key(0), key(1)])


def test_segment_writer_meta_lands_in_attributes(store):
    with store.writer(rows_per_segment=10, meta={"probe_version": "9.9", "torch_version": "x"}) as w:
        w.add([key(0)], rows([0]))
    with h5py.File(store.segment_files()[0], "r") as f:
        assert f.attrs["probe_version"] == "9.9" and f.attrs["torch_version"] == "x"


# -- temporaries, verify, compact ----------------------------------------------------------------------------


def test_temporary_segments_are_never_read(store):
    write(store, range(2))
    stale = store.segments_dir / f".tmp-{dead_pid()}-deadbeef.h5"
    stale.write_bytes(b"\x89HDF half a file")
    live = store.segments_dir / f".tmp-{os.getpid()}-cafecafe.h5"
    live.write_bytes(b"being written")
    store.refresh()
    assert len(store) == 2
    assert store.stale_temporaries() == [stale]
    report = store.verify()
    assert report.ok and report.files == 1
    assert any(stale.name in n for n in report.notes)
    invoke("cache", "verify", "--cache", store.path.parent.parent)


def test_verify_passes_on_a_clean_cache(store):
    write(store, range(3))
    write(store, range(3, 5))
    report = store.verify()
    assert report.ok and report.problems == []
    assert (report.files, report.rows, report.unique_rows) == (2, 5, 5)
    result = invoke("cache", "verify", "--cache", store.path.parent.parent)
    assert f"{store.space.id}: ok" in result.output


def test_verify_detects_features_rewritten_without_checksum(store):
    write(store, range(3))
    seg = write(store, range(3, 6))
    store.close()
    with h5py.File(seg, "r+") as f:
        f["features"][1, 2] = 42.0
    report = store.verify()
    assert not report.ok
    assert any(seg.name in p and "checksum" in p for p in report.problems)
    result = invoke("cache", "verify", "--cache", store.path.parent.parent, expect=1)
    assert "FAILED" in result.output and "checksum" in result.output


def test_verify_detects_flipped_bytes_on_disk(store):
    seg = write(store, range(5))
    store.close()
    with h5py.File(seg, "r") as f:
        offset = f["features"].id.get_offset()  # contiguous dataset: its bytes start here
    assert offset is not None
    with open(seg, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x01]))  # lowest mantissa bit of the first value: still a finite float
    assert not store.verify().ok
    assert any("checksum" in p for p in store.verify().problems)


def test_verify_reports_a_truncated_segment(store):
    write(store, range(2))
    seg = write(store, range(2, 4))
    store.close()
    data = seg.read_bytes()
    seg.write_bytes(data[: len(data) // 2])
    # Readers warn, name the segment and treat its rows as missing (a writing run extracts them again).
    reader = FeatureCache(store.path.parent.parent).open(make_space())
    assert sorted(reader.keys()) == sorted(key(i) for i in range(2))
    assert [d.path for d in reader.damaged] == [seg] and "unreadable" in reader.damaged[0].problem
    reader.close()
    report = FeatureCache(store.path.parent.parent).open_path(store.path, scan=False).verify()
    assert any(seg.name in p and "unreadable" in p for p in report.problems)
    result = invoke("cache", "verify", "--cache", store.path.parent.parent, expect=1)
    assert seg.name in result.output and "Traceback" not in result.output


def test_compact_merges_drops_duplicates_removes_stale_temporaries(store):
    write(store, range(0, 5))
    write(store, range(3, 8))  # 3 and 4 again
    store.write_segment([key(8)], rows([8]))  # no paths dataset
    stale = store.segments_dir / f".tmp-{dead_pid()}-0123abcd.h5"
    stale.write_bytes(b"partial")
    live = store.segments_dir / f".tmp-{os.getpid()}-4567abcd.h5"
    live.write_bytes(b"being written by a live process")
    expected = store.get([key(i) for i in range(9)])

    assert store.compact() == (3, 1)
    assert not stale.exists() and live.exists()
    assert len(store.segment_files()) == 1 and len(store) == 9
    np.testing.assert_array_equal(store.get([key(i) for i in range(9)]), expected)
    report = store.verify()
    assert report.ok and report.rows == report.unique_rows == 9
    with h5py.File(store.segment_files()[0], "r") as f:
        assert int(f.attrs["compacted_from"]) == 3
        paths = dict(zip((k.decode() for k in f["keys"][...]), f["paths"].asstr()[...]))
    assert paths[key(4)] == "img/4.png" and paths[key(8)] == ""

    live.unlink()
    assert store.compact() == (1, 1)  # nothing left to merge


def test_compact_with_float16_keeps_values(cache_dir):
    store = FeatureCache(cache_dir).open(make_space(dtype="float16"))
    write(store, range(3))
    write(store, range(3, 6))
    before = store.get([key(i) for i in range(6)])
    store.compact()
    np.testing.assert_array_equal(store.get([key(i) for i in range(6)]), before)
    assert store.verify().ok
    store.close()


def test_cli_compact(store):
    write(store, range(2))
    write(store, range(2, 4))
    store.close()
    result = invoke("cache", "compact", "--cache", store.path.parent.parent)
    assert f"{store.space.id}: 2 segments -> 1" in result.output
    assert len(store.segment_files()) == 1


# -- the cache root and its CLI ------------------------------------------------------------------------------


def test_cache_info_lists_spaces_with_row_counts(cache_dir):
    fc = FeatureCache(cache_dir)
    a = fc.open(make_space())
    b = fc.open(make_space(layer="conv1", dim=3))
    write(a, range(7))
    b.write_segment([key(0)], np.zeros((1, 3), np.float32))
    a.close()
    b.close()
    out = invoke("cache", "info", "--cache", cache_dir).output
    lines = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert lines[a.space.id][1:3] == ["test:synthetic", "penultimate"]
    assert lines[a.space.id][5] == "7"
    assert lines[b.space.id][2:4] == ["conv1", "3"]
    assert lines[b.space.id][5] == "1"
    assert "no feature spaces" in invoke("cache", "info", "--cache", cache_dir / "empty").output


def test_cache_ls_find_and_rm(cache_dir):
    fc = FeatureCache(cache_dir)
    store = fc.open(make_space())
    write(store, range(3))
    store.close()
    assert fc.find(store.space.digest) == store.path
    assert fc.find(store.space.id[:6]) == store.path
    with pytest.raises(ProbeError, match="0 feature spaces"):
        fc.find("ffffffffffffffff" if not store.space.id.startswith("f") else "0000000000000000")
    out = invoke("cache", "ls", store.space.id[:8], "--cache", cache_dir, "--limit", "2").output
    assert '"backbone": "test:synthetic"' in out
    assert sum(1 for line in out.splitlines() if line in {key(0), key(1), key(2)}) == 2
    invoke("cache", "rm", store.space.id, "--cache", cache_dir)
    assert not store.path.exists() and fc.stores() == []
    result = invoke("cache", "rm", store.space.id, "--cache", cache_dir, expect=1)
    assert "Traceback" not in result.output


def test_cache_module_does_not_import_torch(tmp_path):
    code = (
        "import sys, numpy as np\n"
        "from probe.cache import FeatureCache, FeatureSpace\n"
        f"s = FeatureCache({str(tmp_path)!r}).open(FeatureSpace('x', '0', {{}}, 'penultimate', 'none', 2))\n"
        "s.write_segment(['a' * 64], np.ones((1, 2), np.float32)); s.verify(); s.compact()\n"
        "assert 'torch' not in sys.modules, 'probe.cache imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=subprocess_env(), cwd=REPO_ROOT, timeout=60)


def test_the_reference_reader_in_the_format_spec_reads_a_probe_cache(store):
    """docs/cache-format.md ends with a minimal h5py-only reader; it must agree with probe."""
    import re

    spec = (REPO_ROOT / "docs" / "cache-format.md").read_text()
    code = re.findall(r"```python\n(.*?)```", spec, re.S)[-1]
    namespace: dict = {}
    exec(compile(code, "docs/cache-format.md", "exec"), namespace)
    write(store, range(0, 4))
    write(store, range(2, 6))  # duplicates: first occurrence wins
    store.write_segment([key(1)], rows([50]))
    space, index, get = namespace["read_space"](store.path)
    assert space == store.space.to_dict() and set(index) == set(store.keys())
    order = [key(i) for i in (5, 1, 1, 0)]
    np.testing.assert_array_equal(get(order), store.get(order))
