"""The training view and the feature stream: an index into memory-mapped vectors, bounded memory."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import pipeline.features.loader as loader_module
from pipeline.errors import PipelineError
from pipeline.features.loader import FeatureLoader, LoaderConfig
from pipeline.features.view import ROW_GROUP_ROWS, feature_table
from pipeline.reporting import Silent
from pipeline.store import catalog
from pipeline.store.layout import Store
from tests.conftest import planted_store

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory):
    store = planted_store(tmp_path_factory.mktemp("loader"), rows=2000, dim=8)
    return store, feature_table(store, "planted")


def _stored(store, modality: str) -> dict[str, np.ndarray]:
    rows = catalog.query(store, "SELECT content_hash, vector FROM embeddings WHERE modality = ?", [modality])
    return {h: np.asarray(v, np.float32) for h, v in zip(rows.column(0).to_pylist(), rows.column(1).to_pylist(),
                                                         strict=True)}


def test_each_epoch_yields_every_train_row_once_in_a_new_order(table) -> None:
    store, ft = table
    expected = catalog.query(store, "SELECT sample_id FROM samples WHERE split = 'train'").column(0).to_pylist()
    loader = FeatureLoader(ft, ("train",), LoaderConfig(batch_size=500, shuffle=True, buffer_rows=3000))
    orders = []
    for epoch in range(2):
        ids = np.concatenate([b.sample_id for b in loader.epoch(epoch)])
        assert sorted(ids.tolist()) == sorted(expected)
        orders.append(ids)
    assert not np.array_equal(orders[0], orders[1])
    again = np.concatenate([b.sample_id for b in loader.epoch(0)])
    assert np.array_equal(orders[0], again)  # same seed and epoch, same order
    assert loader.count() == len(expected)


def test_batches_mix_classes_and_carry_the_stored_vectors(table) -> None:
    store, ft = table
    images, texts = _stored(store, "image"), _stored(store, "text")
    pairs = catalog.query(store, "SELECT sample_id, text_hash FROM samples").to_pylist()
    text_of = {p["sample_id"]: p["text_hash"] for p in pairs}
    batch = next(FeatureLoader(ft, ("train",), LoaderConfig(batch_size=256, shuffle=True, seed=3)).epoch(0))
    assert 0.6 < batch.y.float().mean().item() < 0.95  # 4 generated : 1 real, not sorted by class
    for sid, x in zip(batch.sample_id[:20], batch.x.numpy()[:20], strict=True):
        assert np.allclose(x[:8], images[sid], atol=1e-3) and np.allclose(x[8:], texts[text_of[sid]], atol=1e-3)


@pytest.mark.parametrize("bucket_rows", [None, 512])
def test_a_pass_in_row_order_yields_every_row_once_sorted_by_matrix_row(table, monkeypatch, bucket_rows) -> None:
    store, ft = table
    if bucket_rows:  # the 10,000-row matrices sorted in 20 buckets of 512 matrix rows: the same rows, same order
        whole = [b.sample_id for b in FeatureLoader(ft, SPLITS, LoaderConfig(batch_size=300, order="rows")).epoch(0)]
        monkeypatch.setattr(loader_module, "ORDER_BUCKET_ROWS", bucket_rows)
        bucketed = [b.sample_id for b in FeatureLoader(ft, SPLITS, LoaderConfig(batch_size=300, order="rows")).epoch(0)]
        assert ft.images.rows > 16 * bucket_rows and np.array_equal(np.concatenate(whole), np.concatenate(bucketed))
    view = FeatureLoader(ft, SPLITS, LoaderConfig(batch_size=300))
    rows = FeatureLoader(ft, SPLITS, LoaderConfig(batch_size=300, order="rows"))
    by_view = {sid: (x, y) for b in view.epoch(0)
               for sid, x, y in zip(b.sample_id, b.x.numpy(), b.y.numpy(), strict=True)}
    batches = list(rows.epoch(0))
    assert all(len(b.y) == 300 for b in batches[:-1]) and 0 < len(batches[-1].y) <= 300
    ids = np.concatenate([b.sample_id for b in batches])
    image_rows = np.concatenate([b.column("image_row") for b in batches])
    assert len(ids) == len(set(ids.tolist())) == len(by_view)  # every row once
    assert (np.diff(image_rows) >= 0).all()  # in file order
    for b in batches:  # the same vectors and labels as the view's order gives them
        for sid, x, y in zip(b.sample_id, b.x.numpy(), b.y.numpy(), strict=True):
            assert np.array_equal(x, by_view[sid][0]) and y == by_view[sid][1]
    text, text_view = (FeatureLoader(ft, ("test",), LoaderConfig("text", 256, order=o)) for o in ("rows", "view"))
    text_rows = np.concatenate([b.column("text_row") for b in text.epoch(0)])
    assert (np.diff(text_rows) >= 0).all() and len(text_rows) == sum(len(b.y) for b in text_view.epoch(0))
    assert text.skipped_missing_text == text_view.skipped_missing_text
    with pytest.raises(PipelineError, match="order"):
        FeatureLoader(ft, SPLITS, LoaderConfig(order="rows", shuffle=True))


def test_a_sort_spill_left_by_a_killed_process_is_removed_and_a_live_ones_kept(table) -> None:
    import os

    _, ft = table
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    left = ft.directory / f"sort-{dead}-x1"  # a killed pass's DuckDB spill
    (left / "duckdb_temp_block-0.block").parent.mkdir()
    (left / "duckdb_temp_block-0.block").write_bytes(b"\0" * 1024)
    live = ft.directory / f"sort-{os.getppid()}-x2"
    live.mkdir()
    assert sum(len(b.y) for b in FeatureLoader(ft, ("val",), LoaderConfig(order="rows")).epoch(0)) > 0
    assert not left.exists() and live.exists()
    live.rmdir()
    assert not list(ft.directory.glob("sort-*"))  # the pass's own spill is gone with it


def test_memory_is_bounded_by_the_buffer_not_the_store(table) -> None:
    _, ft = table
    loader = FeatureLoader(ft, ("train",), LoaderConfig(batch_size=256, shuffle=True, buffer_rows=2048))
    total = sum(b.x.shape[0] for b in loader.epoch(0))
    assert total > 4 * 2048  # the split is much larger than the buffer ...
    assert loader.max_buffered < 2048 + ROW_GROUP_ROWS + 256  # ... yet never more than buffer + one row group


def test_feature_sets_and_dtypes(table) -> None:
    _, ft = table
    for features, width in (("image", 8), ("text", 8), ("image+text", 16)):
        batch = next(FeatureLoader(ft, ("val",), LoaderConfig(features, batch_size=64)).epoch(0))
        assert batch.x.dtype == torch.float32 and batch.x.shape == (64, width)
        assert set(batch.split.tolist()) == {"val"}
    with pytest.raises(PipelineError, match="--features"):
        FeatureLoader(ft, ("val",), LoaderConfig("pixels"))


def test_new_samples_append_a_part_and_vectors_are_laid_out_once(tmp_path: Path) -> None:
    store = planted_store(tmp_path, rows=50, dim=4)
    first = feature_table(store, "planted")
    assert feature_table(store, "planted").parts == first.parts  # nothing changed: reused as is
    planted_store(tmp_path, rows=30, dim=4, seed=1, file_name="0001.h5")  # more samples
    second = feature_table(store, "planted")
    for features in ("image", "text"):
        assert second.data_fingerprint(features) != first.data_fingerprint(features)
    assert second.parts[0] == first.parts[0] and len(second.parts) == 2  # appended, not rebuilt
    assert second.rows == 250 + 150 and second.images.rows == 400  # one vector row per image, never copied
    ids = np.concatenate([b.sample_id for b in FeatureLoader(second, SPLITS, LoaderConfig()).epoch(0)])
    assert len(ids) == len(set(ids)) == 400
    shared = feature_table(store, "planted", "shared")  # another pairing: its own view, the same vectors
    assert shared.images.directory == second.images.directory and shared.rows == 400


def test_shared_pairing_gives_a_real_image_its_siblings_text(tmp_path: Path) -> None:
    store = planted_store(tmp_path, rows=40, dim=4)
    texts = _stored(store, "text")
    prompt_of = {r["group_key"]: r["text_hash"] for r in catalog.query(
        store, "SELECT group_key, any_value(text_hash) AS text_hash FROM samples WHERE label = 1 GROUP BY 1"
    ).to_pylist()}
    group_of = {r["sample_id"]: r["group_key"] for r in catalog.query(
        store, "SELECT sample_id, group_key FROM samples").to_pylist()}
    ft = feature_table(store, "planted", "shared")
    for b in FeatureLoader(ft, SPLITS, LoaderConfig("text", batch_size=1000)).epoch(0):
        for sid, x in zip(b.sample_id, b.x.numpy(), strict=True):
            assert np.allclose(x, texts[prompt_of[group_of[sid]]], atol=1e-3)


def test_raw_input_norm_restores_the_vectors_as_imported(tmp_path: Path) -> None:
    import h5py

    store = planted_store(tmp_path, rows=30, dim=6)
    with h5py.File(tmp_path / "h5" / "0000.h5", "r") as f:
        real = np.asarray(f["real"], np.float32)
    ft = feature_table(store, "planted")
    real_rows = {r["sample_id"]: int(r["group_key"].rsplit(":", 1)[1]) for r in catalog.query(
        store, "SELECT sample_id, group_key FROM samples WHERE label = 0").to_pylist()}
    loader = FeatureLoader(ft, SPLITS, LoaderConfig("image", batch_size=1000, input_norm="raw"))
    seen = 0
    for b in loader.epoch(0):
        for sid, x in zip(b.sample_id, b.x.numpy(), strict=True):
            if sid in real_rows:
                assert np.allclose(x, real[real_rows[sid]], rtol=2e-3, atol=2e-3)
                seen += 1
    assert seen == 30
    unit = next(FeatureLoader(ft, SPLITS, LoaderConfig("image", batch_size=1000)).epoch(0)).x
    assert torch.allclose(unit.norm(dim=1), torch.ones(len(unit)), atol=2e-3)


_MEASURE = r"""
import json, sys, threading, time
from pathlib import Path

def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0

peak = [0]
def sample():
    while True:
        peak[0] = max(peak[0], anon_kb())
        time.sleep(0.002)

import pipeline.features.vectors as vectors
import pipeline.features.view as view
from pipeline.features.loader import FeatureLoader, LoaderConfig
from pipeline.features.view import feature_table
from pipeline.store.layout import Store

# chunks smaller than the small store, so both stores show the steady state, not the first chunk
vectors.READ_ROWS = view.ROW_GROUP_ROWS = 512
store = Store(Path(sys.argv[1]))
threading.Thread(target=sample, daemon=True).start()
time.sleep(0.05)
base = peak[0] = anon_kb()
table = feature_table(store, "planted")
view = peak[0] - base
base = peak[0] = anon_kb()
loader = FeatureLoader(table, ("train", "val", "test"), LoaderConfig(batch_size=512, shuffle=True, buffer_rows=4096))
rows = sum(len(b.y) for b in loader.epoch(0))
time.sleep(0.01)
print(json.dumps({"view_kb": view, "epoch_kb": peak[0] - base, "rows": rows}))
"""


@pytest.mark.slow
def test_view_build_and_epoch_memory_stay_flat_when_rows_grow_tenfold(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Peak anonymous memory (sampled RSS of a fresh process) of building the view and of one epoch.

    At 768 dimensions the vectors of 20,000 samples take 117 MB as float32 batches (image and
    text): a loader or a view builder that held them all would grow by that much; one that streams
    grows by its index rows and DuckDB's hash tables only (bounded by its memory limit)."""
    import pipeline.store.atomic as atomic

    monkeypatch.setattr(atomic, "VECTOR_GROUP_ROWS", 512)  # row groups smaller than the small store
    measured = {}
    for rows in (400, 4000):
        store = planted_store(tmp_path / str(rows), rows=rows, dim=768)
        out = subprocess.run([sys.executable, "-c", _MEASURE, str(store.root)], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).parent.parent)
        measured[rows] = json.loads(out.stdout.strip().splitlines()[-1])
    small, large = measured[400], measured[4000]
    assert large["rows"] == 10 * small["rows"] == 20000
    held = large["rows"] * 2 * 768 * 4 // 1024  # KB of float32 vectors a non-streaming epoch would hold
    assert large["epoch_kb"] - small["epoch_kb"] < held / 2, measured
    assert large["view_kb"] - small["view_kb"] < held / 2, measured


def test_batches_made_ahead_keep_their_order_raise_their_errors_and_stop_with_the_consumer() -> None:
    import threading

    from pipeline.ahead import in_thread as _ahead

    closed = []

    def numbers(fail_at: int | None = None):
        try:
            for i in range(100):
                if i == fail_at:
                    raise ValueError("bad row group")
                yield i
        finally:
            closed.append(True)

    assert list(_ahead(numbers(), 2)) == list(range(100))
    with pytest.raises(ValueError, match="bad row group"):
        list(_ahead(numbers(fail_at=7), 2))
    first = _ahead(numbers(), 2)
    assert [next(first) for _ in range(3)] == [0, 1, 2]
    first.close()  # the consumer leaves early: the producer stops and its source is closed
    assert len(closed) == 3
    assert not [t for t in threading.enumerate() if t.name == "ahead"]  # and its thread has ended

    made: list[int] = []

    def endless():
        for i in range(10**9):
            made.append(i)
            yield i

    second = _ahead(endless(), 1)
    assert [next(second) for _ in range(3)] == [0, 1, 2]
    second.close()
    assert len(made) <= 3 + 2  # at most one waiting and one being made when it was closed


def test_a_rebuilt_view_keeps_the_parts_a_live_table_reads_and_drops_them_once_it_is_gone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    from pipeline.features import view
    from pipeline.store.layout import Store

    store = planted_store(tmp_path, rows=50, dim=4)
    first = feature_table(store, "planted")
    monkeypatch.setattr(view, "MAX_PARTS", 1)  # the next change rebuilds the view instead of appending
    planted_store(tmp_path, rows=30, dim=4, seed=1, file_name="0001.h5")
    second = feature_table(Store(store.root), "planted")  # (another trainer: its own Store, its own pins)
    assert set(second.parts).isdisjoint(first.parts) and all(p.exists() for p in first.parts)
    ids = np.concatenate([b.sample_id for b in FeatureLoader(first, SPLITS, LoaderConfig()).epoch(0)])
    assert len(ids) == first.rows == 250  # the first trainer reads every row of its own view still
    del first, ids
    gc.collect()
    third = feature_table(Store(store.root), "planted")
    assert third.parts == second.parts
    assert sorted(p.name for p in third.directory.glob("part-*.parquet")) == sorted(p.name for p in third.parts)


def test_two_trainers_build_the_same_view_while_an_import_appends(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from pipeline.features import view
    from pipeline.store.layout import Store

    store = planted_store(tmp_path, rows=40, dim=4)
    monkeypatch.setattr(view, "MAX_PARTS", 2)  # appends and rebuilds both happen
    errors: list[BaseException] = []
    seen: list[int] = []

    def trainer() -> None:
        try:
            for _ in range(4):
                table = feature_table(Store(store.root), "planted")
                rows = sum(len(b.sample_id) for b in FeatureLoader(table, SPLITS, LoaderConfig()).epoch(0))
                assert rows == table.rows
                seen.append(rows)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    def importer() -> None:
        try:
            for k in range(1, 4):
                planted_store(tmp_path, rows=10, dim=4, seed=k, file_name=f"{k:04d}.h5")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=f) for f in (trainer, trainer, importer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert len(seen) == 8 and feature_table(Store(store.root), "planted").rows == 5 * (40 + 3 * 10)


def test_a_view_that_does_not_fit_its_first_memory_bound_is_built_under_the_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("h5py")
    from pipeline.features import view
    from pipeline.stages.import_features import ImportConfig
    from pipeline.stages.import_features import run as import_features
    from tests.test_import_features import _h5

    _h5(tmp_path / "h5" / "0000.h5", rows=400, image_dim=8, text_dim=8)
    store = Store(tmp_path / "store")
    import_features(ImportConfig(tmp_path / "h5", "h5", store, "m"))
    tried: list[tuple[str, str]] = []
    write_part = view._write_part

    def spy(*args: Any) -> dict[str, Any]:
        try:
            part = write_part(*args)
        except Exception as exc:
            tried.append((args[-1], type(exc).__name__))
            raise
        tried.append((args[-1], "built"))
        return part

    monkeypatch.setattr(view, "_write_part", spy)
    monkeypatch.setattr(view, "DUCKDB_MEMORY", ("1MB", "1GB"))
    notes: list[str] = []

    class Notes(Silent):
        def note(self, message: str) -> None:
            notes.append(message)

    table = view.feature_table(store, "m", reporter=Notes())
    assert tried == [("1MB", "OutOfMemoryException"), ("1GB", "built")]
    assert table.rows == 2000
    # the retry is said, never silent: one sentence, to the reporter as it happens and in the result
    assert notes == list(table.retries) and len(notes) == 1
    assert notes[0].startswith("The training view did not fit in DuckDB's 1MB (Out of Memory Error")
    assert notes[0].endswith("built again under 1GB.")
    assert view.feature_table(store, "m").retries == ()  # found built: nothing tried again


def test_train_says_in_one_line_that_its_view_was_built_again_under_a_larger_bound(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the CLI: the view's retry is a warning line on the terminal and in `--json`'s warnings."""
    pytest.importorskip("h5py")
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.features import view
    from tests.test_import_features import cli_imported_store

    store = cli_imported_store(tmp_path, rows=40)
    runner = CliRunner()
    monkeypatch.setattr(view, "DUCKDB_MEMORY", ("1MB", "1GB"))
    train = ["train", "--store", store, "--epochs", "1", "--batch-size", "16", "--no-sam", "--features", "image"]
    done = runner.invoke(app, [*train, "--json"])
    assert done.exit_code == 0, done.output
    warnings = json.loads(done.stdout)["warnings"]
    assert [w for w in warnings if "training view" in w] == [
        next(w for w in warnings if w.startswith("The training view did not fit in DuckDB's 1MB"))]
    assert "built again under 1GB." in warnings[0]
    shown = runner.invoke(app, [*train, "--seed", "2"])  # the view is built: nothing to say
    assert shown.exit_code == 0 and "training view" not in shown.output
    shutil.rmtree(tmp_path / "store" / "cache" / "views")
    shown = runner.invoke(app, [*train, "--seed", "3"])
    assert shown.exit_code == 0, shown.output
    lines = [line for line in shown.output.splitlines() if "training view did not fit" in line]
    assert len(lines) == 1 and "1MB" in lines[0]


def test_a_view_whose_limit_is_hit_while_its_rows_stream_is_built_under_the_next_bound(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At 5M samples DuckDB ran out of the first bound halfway through the sorted rows, and the error came
    through pyarrow's reader as an OSError, not as `duckdb.OutOfMemoryException`: the view failed instead of
    being built under the next bound (and train, sweep, score and report with it)."""
    pytest.importorskip("h5py")
    import pyarrow as pa

    from pipeline.features import view
    from pipeline.stages.import_features import ImportConfig
    from pipeline.stages.import_features import run as import_features
    from pipeline.store import duck
    from tests.test_import_features import _h5

    _h5(tmp_path / "h5" / "0000.h5", rows=400, image_dim=8, text_dim=8)
    store = Store(tmp_path / "store")
    import_features(ImportConfig(tmp_path / "h5", "h5", store, "m"))
    streamed = duck.batches
    calls: list[int] = []

    class HalfThenOutOfMemory:
        """The first bound's rows: one batch, then DuckDB's error as pyarrow raises it."""

        def __init__(self, reader: pa.RecordBatchReader) -> None:
            self.reader, self.schema = reader, reader.schema

        def __iter__(self):  # type: ignore[no-untyped-def]
            yield self.reader.read_next_batch()
            raise OSError("Out of Memory Error: failed to pin block of size 256.0 KiB (244.0 MiB/244.1 MiB used)")

    def batches(rel: Any, rows: int) -> Any:
        calls.append(rows)
        reader = streamed(rel, rows)
        return HalfThenOutOfMemory(reader) if len(calls) == 1 else reader

    monkeypatch.setattr(duck, "batches", batches)
    table = view.feature_table(store, "m")
    # the first bound failed in its first bucket; the second bound read every bucket (one a split) and built it, whole
    assert len(calls) == 1 + 3 and table.rows == 2000
    assert [p.name for p in table.directory.iterdir() if "part-" in p.name] == [table.parts[0].name]
    assert not list(table.directory.glob(".*.tmp"))  # the joined rows' temp file is gone with the failed try


def test_a_view_sorted_in_buckets_has_the_rows_of_one_sort_in_the_same_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The view's sort runs one bucket (split, range of hash(sample_id)) at a time, so its memory does not
    grow with the rows: many buckets give the same part, row for row, as one sort of every row."""
    pytest.importorskip("h5py")
    import pyarrow.parquet as pq

    from pipeline.features import view

    store = planted_store(tmp_path / "s", rows=300, dim=4)
    one = feature_table(store, "planted")
    assert view._bucket_bits(one.rows) == 0  # (one bucket a split)
    whole = pq.read_table(one.parts[0])
    monkeypatch.setattr(view, "BUCKET_ROWS", 64)  # 1,500 samples: 32 hash ranges, each split in each
    shutil.rmtree(one.directory)
    many = feature_table(store, "planted")
    assert view._bucket_bits(1500) == 5
    bucketed = pq.read_table(many.parts[0])
    assert bucketed.num_rows == 1500 and bucketed.equals(whole)
    assert (many.row_digest, many.text_digest) == (one.row_digest, one.text_digest)
    order = bucketed.column("split").to_pylist()
    assert order == sorted(order) and len(set(order)) == 3  # split by split, as before


def test_a_killed_view_builds_bucket_folder_is_removed_by_the_next_build(tmp_path: Path) -> None:
    """The joined rows are a temp folder (a subfolder a bucket): one a killed build left is removed whole
    by the next build, as a temp file was (a temp folder used to be skipped: it cannot be unlinked)."""
    pytest.importorskip("h5py")
    from pipeline.store.atomic import temp_path

    store = planted_store(tmp_path / "s", rows=20, dim=4)
    directory = store.root / "cache" / "views" / "planted" / "as-ingested"
    left = temp_path(directory / "samples-with-images")
    (left / "split=train" / "_bucket=0").mkdir(parents=True)
    (left / "split=train" / "_bucket=0" / "data_0.parquet").write_bytes(b"rows of a killed build")
    dead = left.with_name(left.name.replace(f"~{os.getpid()}~", "~999999999~"))  # an owner no longer alive
    left.rename(dead)
    table = feature_table(store, "planted")
    assert table.rows == 100 and not dead.exists()
    assert not list(directory.glob(".*.tmp"))


def test_train_on_a_view_sorted_in_many_buckets_gives_the_same_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the CLI: the same store trained with a view sorted in one bucket a split and in 32 gives the
    same numbers (the same rows in the same order, so the same batches)."""
    pytest.importorskip("h5py")
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.features import view

    planted_store(tmp_path / "a", rows=300, dim=4)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    runner = CliRunner()

    def train(folder: str) -> dict[str, Any]:
        done = runner.invoke(app, ["train", "--store", str(tmp_path / folder / "store"), "--epochs", "1",
                                   "--batch-size", "64", "--no-sam", "--threads", "1", "--json"])
        assert done.exit_code == 0, done.output
        return json.loads(done.stdout)["metrics"]

    one = train("a")
    monkeypatch.setattr(view, "BUCKET_ROWS", 64)
    many = train("b")
    assert view._bucket_bits(1500) == 5
    assert one["test"] == many["test"] and one["val"] == many["val"] and one["test"]["auc"] is not None


def test_train_scores_every_sample_when_its_scoring_pass_sorts_in_buckets(tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    store = planted_store(tmp_path, rows=600, dim=8)
    monkeypatch.setattr(loader_module, "ORDER_BUCKET_ROWS", 256)  # 3,000 images: 12 buckets
    done = CliRunner().invoke(app, ["train", "--store", str(store.root), "--epochs", "1", "--batch-size", "256"])
    assert done.exit_code == 0, done.output
    scored = catalog.query(store, "SELECT count(*), count(DISTINCT sample_id) FROM scores").to_pylist()[0]
    samples = catalog.query(store, "SELECT count(*) FROM samples").to_pylist()[0]
    assert list(scored.values()) == [samples["count_star()"]] * 2
