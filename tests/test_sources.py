"""Inputs -> records (folders, CSV/TSV tables, files) and content hashing with the SQLite memo."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest

from conftest import TINY, make_image
from probe.errors import InputError
from probe.sources import MEMO_FILE, HashMemo, Record, from_folder, from_table, hash_files, resolve


def test_folder_labels_come_from_class_folders(image_folder):
    records = from_folder(image_folder)
    assert len(records) == 24
    assert {r.label for r in records} == {"cat", "dog", "fish"}
    for r in records:
        assert Path(r.path).parent.name == r.label
        assert Path(r.path).is_file()
    assert records == sorted(records, key=lambda r: r.path)  # stable order
    assert resolve(image_folder) == records
    assert resolve(str(image_folder)) == records


def test_folder_walk_skips_hidden_and_non_images_and_files_at_the_top(tmp_path):
    root = tmp_path / "data"
    make_image(root / "top.png", seed=1)
    make_image(root / "a" / "x.JPG", seed=2)
    make_image(root / "a" / "deeper" / "y.png", seed=3)
    make_image(root / "a" / ".hidden.png", seed=4)
    make_image(root / ".cache" / "z.png", seed=5)
    (root / "a" / "notes.txt").write_text("not an image")
    got = {(Path(r.path).relative_to(root).as_posix(), r.label) for r in from_folder(root)}
    assert got == {("top.png", None), ("a/x.JPG", "a"), ("a/deeper/y.png", "deeper")}


def test_resolve_errors_name_the_input(tmp_path):
    with pytest.raises(InputError, match="no_such_dir"):
        resolve(tmp_path / "no_such_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: folder holds no image files"):
        resolve(tmp_path / "empty")
    make_image(tmp_path / "ok.png", seed=0)
    with pytest.raises(InputError, match="missing.csv"):
        resolve([tmp_path / "ok.png", tmp_path / "missing.csv"])


def test_resolve_mixes_files_folders_and_tables(tmp_path, image_folder):
    single = make_image(tmp_path / "single.png", seed=0)
    table = tmp_path / "list.csv"
    table.write_text("single.png,odd\n")
    records = resolve([single, image_folder, table])
    assert records[0] == Record(str(single), None)
    assert records[-1] == Record(str(tmp_path / "single.png"), "odd")
    assert len(records) == 26


def write_table(path: Path, text: str, encoding="utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def test_csv_with_header_resolves_relative_paths_against_its_folder(tmp_path, monkeypatch):
    d = tmp_path / "lists"
    table = write_table(d / "train.csv", f"path,label\nimgs/a.png,cat\n{tmp_path / 'abs.png'},dog\n")
    monkeypatch.chdir(tmp_path)  # the working directory does not matter
    assert from_table(table) == [Record(str(d / "imgs" / "a.png"), "cat"), Record(str(tmp_path / "abs.png"), "dog")]


def test_csv_header_columns_in_any_order_and_extra_columns(tmp_path):
    table = write_table(tmp_path / "t.csv", "id,Label,Path\n1,cat,a.png\n2,,b.png\n")
    assert from_table(table) == [Record(str(tmp_path / "a.png"), "cat"), Record(str(tmp_path / "b.png"), None)]
    table = write_table(tmp_path / "u.csv", "path\na.png\n")
    assert from_table(table) == [Record(str(tmp_path / "a.png"), None)]


def test_csv_without_header(tmp_path):
    table = write_table(tmp_path / "t.csv", "a.png,cat\n\n b.png , dog \n")
    assert from_table(table) == [Record(str(tmp_path / "a.png"), "cat"), Record(str(tmp_path / "b.png"), "dog")]
    table = write_table(tmp_path / "paths.csv", "a.png\nsub/b.png\n")
    assert from_table(table) == [Record(str(tmp_path / "a.png")), Record(str(tmp_path / "sub" / "b.png"))]


def test_tsv_and_utf8_bom(tmp_path):
    table = write_table(tmp_path / "t.tsv", "path\tlabel\nwith,comma.png\tcat\n")
    assert from_table(table) == [Record(str(tmp_path / "with,comma.png"), "cat")]
    table = write_table(tmp_path / "bom.csv", "path,label\nä.png,dog\n", encoding="utf-8-sig")
    assert from_table(table) == [Record(str(tmp_path / "ä.png"), "dog")]
    assert resolve(table) == from_table(table)


def test_malformed_tables_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="empty table"):
        from_table(write_table(tmp_path / "empty.csv", "\n\n"))
    with pytest.raises(InputError, match=r"rows.csv:3: no path"):
        from_table(write_table(tmp_path / "rows.csv", "path,label\na.png,cat\n,dog\n"))
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("path\n\xe9t\xe9.png\n".encode("latin-1"))
    with pytest.raises(InputError, match="not a UTF-8"):
        from_table(latin1)


def test_table_row_with_missing_file_is_a_failure_not_a_crash(tmp_path, cache_dir):
    from probe.engine import extract

    make_image(tmp_path / "a.png", seed=1)
    make_image(tmp_path / "c.png", seed=3)
    table = write_table(tmp_path / "t.csv", "path,label\na.png,x\nb.png,y\nc.png,z\n")
    fs = extract(table, TINY, cache_dir, batch_size=2, workers=0, device="cpu", progress=False)
    assert fs.labels == ["x", "z"] and fs.indices == [0, 2]
    assert [(f.index, Path(f.path).name) for f in fs.failures] == [(1, "b.png")]
    assert "b.png" in fs.failures[0].error and "cannot read" in fs.failures[0].error
    assert fs.stats.failed == 1 and fs.stats.new == 2
    assert fs.features.shape == (2, 32)


# -- hashing -------------------------------------------------------------------------------------------------


def test_keys_are_sha256_of_bytes(tmp_path):
    a = make_image(tmp_path / "a.png", seed=1)
    b = tmp_path / "copy_of_a.bin"
    b.write_bytes(a.read_bytes())
    res = hash_files([str(a), str(b)])
    assert res.keys == [hashlib.sha256(a.read_bytes()).hexdigest()] * 2
    assert res.errors == {} and res.read == 2


def test_memo_skips_unchanged_files_and_rehashes_touched_ones(tmp_path):
    files = [make_image(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    paths = [str(p) for p in files]
    memo = HashMemo(tmp_path / "memo" / MEMO_FILE)
    first = hash_files(paths, memo)
    assert first.read == 3
    again = hash_files(paths, memo)
    assert again.read == 0 and again.keys == first.keys

    st = os.stat(files[0])
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, new mtime
    touched = hash_files(paths, memo)
    assert touched.read == 1 and touched.keys == first.keys

    make_image(files[1], seed=99)  # new bytes
    edited = hash_files(paths, memo)
    assert edited.read == 1
    assert edited.keys[1] != first.keys[1] and edited.keys[1] == hashlib.sha256(files[1].read_bytes()).hexdigest()
    memo.close()


def test_memo_table_schema_and_relative_paths(tmp_path, monkeypatch):
    make_image(tmp_path / "a.png", seed=1)
    monkeypatch.chdir(tmp_path)
    memo = HashMemo(tmp_path / MEMO_FILE)
    res = hash_files(["a.png"], memo)
    memo.close()
    db = sqlite3.connect(tmp_path / MEMO_FILE)
    cols = [(r[1], r[2], r[5]) for r in db.execute("PRAGMA table_info(memo)")]
    assert cols == [("path", "TEXT", 1), ("size", "INTEGER", 0), ("mtime_ns", "INTEGER", 0), ("sha256", "TEXT", 0)]
    st = os.stat(tmp_path / "a.png")
    assert db.execute("SELECT * FROM memo").fetchall() == [
        (str(tmp_path / "a.png"), st.st_size, st.st_mtime_ns, res.keys[0])
    ]
    db.close()


def test_unreadable_files_are_reported_by_index(tmp_path):
    a = make_image(tmp_path / "a.png", seed=1)
    res = hash_files([str(tmp_path / "gone.png"), str(a), str(tmp_path)])
    assert res.keys[0] is None and res.keys[1] is not None and res.keys[2] is None
    assert set(res.errors) == {0, 2}
    assert "gone.png: cannot read" in res.errors[0]
