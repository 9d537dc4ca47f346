"""The threaded input pipeline (probe/loader.py): order, batching, failures and bounded read-ahead."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, make_image, make_image_folder
from probe.loader import collate, iter_batches, load_item
from probe.preprocess import Preprocess

PRE = Preprocess(resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _flatten(batches):
    """{index: crop or message} and the order in which indices came out."""
    out, order = {}, []
    for idx, batch, failed in batches:
        assert (batch is None) == (len(idx) == 0)
        if batch is not None:
            assert batch.dtype == np.uint8 and batch.shape == (len(idx), 32, 32, 3)
        items = [(int(i), batch[j]) for j, i in enumerate(idx)] + list(failed)
        for i, value in sorted(items, key=lambda t: t[0]):
            out[i] = value
            order.append(i)
    return out, order


@pytest.fixture
def mixed(bad_files, tmp_path):
    """Good and bad inputs interleaved, plus a PIL image."""
    good = [make_image(tmp_path / f"g{i}.png", seed=i, size=(50 + i, 40)) for i in range(5)]
    items = []
    for g, b in zip(good, bad_files.all):
        items += [str(g), str(b)]
    items.append(Image.new("RGB", (20, 30), (10, 200, 30)))
    return items, bad_files.max_pixels


@pytest.mark.parametrize("threads", [0, 1, 3])
@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_batches_keep_input_order_and_match_one_at_a_time(mixed, threads, batch_size):
    items, max_pixels = mixed
    expected = [load_item(it, PRE, max_pixels) for it in items]
    batches = list(iter_batches(items, PRE, batch_size, max_pixels, threads=threads))
    assert len(batches) == -(-len(items) // batch_size)  # every batch covers batch_size consecutive inputs
    got, order = _flatten(batches)
    assert order == list(range(len(items)))
    for i, (crop, err) in enumerate(expected):
        if crop is not None:
            np.testing.assert_array_equal(got[i], crop)
        else:
            assert got[i] == err


def test_failure_messages_name_the_input(bad_files):
    items = [str(p) for p in bad_files.bad.values()]
    failures = dict(f for _, _, fs in iter_batches(items, PRE, 2, bad_files.max_pixels, threads=2) for f in fs)
    assert sorted(failures) == list(range(len(items)))
    for i, path in enumerate(items):
        assert failures[i].startswith(path + ":"), failures[i]
    assert "empty file" in failures[items.index(str(bad_files.bad["empty.jpg"]))]


def test_a_decoder_bug_is_reported_not_raised(monkeypatch, tmp_path):
    path = make_image(tmp_path / "a.png", seed=1)

    def broken(self, source, max_pixels):
        raise RuntimeError("boom")

    monkeypatch.setattr(Preprocess, "load", broken)
    ((idx, batch, failed),) = iter_batches([str(path)], PRE, 4, threads=1)
    assert batch is None and failed == [(0, f"{path}: RuntimeError: boom")]


class CountingItems(list):
    """A list that records how many items were read, and how far."""

    def __init__(self, items):
        super().__init__(items)
        self.lock = threading.Lock()
        self.read = set()

    def __getitem__(self, i):
        with self.lock:
            self.read.add(i)
        return super().__getitem__(i)


def test_read_ahead_is_bounded_and_closing_stops_reading(tmp_path):
    paths = [str(make_image(tmp_path / f"{i}.png", seed=i)) for i in range(40)]
    items = CountingItems(paths)
    gen = iter_batches(items, PRE, batch_size=2, threads=2, read_ahead=4)
    next(gen)
    assert max(items.read) < 2 + 4  # the first batch plus at most read_ahead items ahead
    gen.close()  # waits for the decodes in flight; the rest are never started
    assert len(items.read) < 2 + 4 + 2


def test_collate_of_only_failures():
    idx, batch, failed = collate([(3, None, "x: bad"), (4, None, "y: bad")])
    assert idx.tolist() == [] and batch is None and failed == [(3, "x: bad"), (4, "y: bad")]


def test_worker_processes_give_the_same_batches(mixed):
    items, max_pixels = mixed
    threaded, _ = _flatten(iter_batches(items, PRE, 3, max_pixels, threads=2))
    processes, order = _flatten(iter_batches(items, PRE, 3, max_pixels, workers=1))
    assert order == list(range(len(items)))
    for i, value in threaded.items():
        if isinstance(value, str):
            assert processes[i] == value
        else:
            np.testing.assert_array_equal(processes[i], value)


# -- through the engine --------------------------------------------------------------------------------------


def test_engine_order_dedup_and_failures_are_the_same_with_and_without_decode_threads(bad_files, tmp_path):
    from probe.engine import Extractor

    images = make_image_folder(tmp_path / "imgs", per_class=3)
    good = sorted(str(p) for p in images.rglob("*.png"))
    dup = tmp_path / "dup.png"
    dup.write_bytes(open(good[0], "rb").read())
    bad_dup = tmp_path / "bad-dup.jpg"
    bad_dup.write_bytes(bad_files.bad["truncated.jpg"].read_bytes())
    inputs = [good[0], str(bad_files.bad["empty.jpg"]), *good[1:5], str(dup), str(bad_dup),
              *map(str, bad_files.all), *good[5:]]
    runs = {}
    for threads in (0, 1, 3):
        fs = Extractor(TINY, tmp_path / f"cache{threads}", device="cpu", batch_size=4, threads=threads,
                       max_pixels=bad_files.max_pixels, progress=False).extract(inputs)
        runs[threads] = fs
    base = runs[0]
    assert base.indices == [i for i, p in enumerate(inputs) if p in good or p == str(dup) or p in
                            map(str, bad_files.good.values())]
    assert base.keys[0] == base.keys[base.indices.index(inputs.index(str(dup)))]  # same bytes, same row
    assert [f.path for f in base.failures] == [p for p in inputs if p in map(str, bad_files.bad.values())
                                               or p == str(bad_dup)]
    for fs in runs.values():
        assert fs.indices == base.indices and fs.keys == base.keys and fs.paths == base.paths
        assert [(f.index, f.path, f.error) for f in fs.failures] == [(f.index, f.path, f.error) for f in base.failures]
        np.testing.assert_array_equal(fs.features, base.features)


def test_progress_bar_shows_rate_and_data_wait(image_folder, tmp_path, monkeypatch):
    from probe import engine

    postfixes = []

    class Bar:
        def __init__(self, *args, **kwargs):
            pass

        def update(self, n):
            pass

        def set_postfix(self, **kwargs):
            postfixes.append(kwargs)

        def close(self):
            pass

    monkeypatch.setattr(engine, "tqdm", Bar)
    engine.Extractor(TINY, tmp_path / "cache", device="cpu", batch_size=8, progress=True).extract(
        sorted(str(p) for p in image_folder.rglob("*.png")))
    assert len(postfixes) == 3
    assert all(set(p) >= {"img/s", "data wait"} for p in postfixes)
    assert postfixes[-1]["data wait"].endswith("%") and float(postfixes[-1]["img/s"]) > 0


def test_pace_is_the_share_of_recent_time_spent_waiting():
    from probe.engine import pace

    assert pace([(8, 0.25, 1.0), (8, 0.75, 1.0)]) == {"img/s": "8.0", "data wait": "50%"}
    assert pace([]) == {}


def test_concurrent_decodes_restore_pillows_globals(tmp_path):
    import warnings

    before_limit, before_filters = Image.MAX_IMAGE_PIXELS, list(warnings.filters)
    paths = [str(make_image(tmp_path / f"{i}.png", seed=i, size=(300, 200))) for i in range(8)] * 4
    items = paths + [str(make_image(tmp_path / "big.png", seed=99, size=(400, 300)))] * 4  # over the limit
    for _ in range(3):
        results, order = _flatten(iter_batches(items, PRE, 5, max_pixels=70_000, threads=4))
        assert order == list(range(len(items)))
        assert all("pixel" in results[i] for i in range(len(paths), len(items)))  # the limit held in every thread
    assert Image.MAX_IMAGE_PIXELS == before_limit
    assert warnings.filters == before_filters
