"""`pipeline sql` reads and exports; it refuses anything that writes."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.errors import PipelineError
from pipeline.stages.sql import export, run_query, to_text
from pipeline.store.layout import Store


@pytest.mark.parametrize(
    "query",
    [
        "DELETE FROM samples",
        "DROP VIEW samples",
        "CREATE TABLE x AS SELECT 1",
        "INSERT INTO shards VALUES ('a', 'b', NULL, 1, now())",
        "COPY samples TO 'out.csv'",
        "ATTACH 'other.duckdb'",
        "SELECT 1; DROP VIEW samples",
    ],
)
def test_writes_are_refused(d3_store: Store, query: str) -> None:
    with pytest.raises(PipelineError, match="read-only|exactly one statement"):
        run_query(d3_store, query)
    assert run_query(d3_store, "SELECT count(*) AS n FROM samples").column(0)[0].as_py() > 0


def test_errors_are_sentences(d3_store: Store) -> None:
    with pytest.raises(PipelineError, match="does not exist"):
        run_query(d3_store, "SELECT * FROM nope")
    with pytest.raises(PipelineError, match="does not parse"):
        run_query(d3_store, "SELEKT 1")


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_export_formats(d3_store: Store, tmp_path: Path, fmt: str) -> None:
    table = run_query(d3_store, "SELECT label, count(*) AS n FROM samples GROUP BY 1 ORDER BY 1")
    path = export(table, tmp_path / f"out.{fmt}", fmt)
    if fmt == "parquet":
        assert pq.read_table(path).to_pylist() == table.to_pylist()
    elif fmt == "json":
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert rows == table.to_pylist()
    else:
        assert path.read_text().splitlines() == ["label,n", "0,11", "1,48"]


def test_csv_quotes_only_where_needed_and_round_trips(d3_store: Store) -> None:
    import csv

    table = run_query(d3_store, "SELECT 'a, \"quoted\" text' AS t, 1 AS n, NULL::VARCHAR AS missing")
    text = to_text(table, "csv")
    assert list(csv.reader(text.splitlines())) == [["t", "n", "missing"], ['a, "quoted" text', "1", ""]]


def test_float16_vectors_read_in_the_sandbox(d3_store: Store) -> None:
    from pipeline.stages.encode import run as encode
    from tests.conftest import encode_config

    encode(encode_config(d3_store))
    row = run_query(d3_store, "SELECT count(*) AS n, max(len(vector)) AS d "
                              "FROM embeddings WHERE modality = 'image'").to_pylist()[0]
    assert row["n"] > 0 and row["d"] > 0
    direct = run_query(d3_store, "SELECT vector FROM embeddings ORDER BY content_hash LIMIT 1").to_pylist()[0]
    from pipeline.store import catalog

    inside = catalog.query(d3_store, "SELECT vector FROM embeddings ORDER BY content_hash LIMIT 1").to_pylist()[0]
    assert direct == inside


def test_latest_scores_reads_the_newest_runs_files_only(tmp_path: Path) -> None:
    """`latest_scores` and `scores_of(run)` answer from one run's score files: through `pipeline sql`,
    with every other run's files unreadable (their footers broken, size and time kept, so no stat check
    notices) they still answer, while the natural subquery cannot; the catalog's view names one run's files."""
    pytest.importorskip("h5py")

    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.store import catalog
    from pipeline.store import manifest as manifests
    from tests.test_import_features import _h5

    _h5(tmp_path / "h5" / "0000.h5", rows=12, image_dim=8, text_dim=8)
    store = str(tmp_path / "store")
    runner = CliRunner()

    def sql(query: str) -> tuple[int, list[dict]]:
        done = runner.invoke(app, ["sql", query, "--store", store, "--format", "json"])
        return done.exit_code, [json.loads(line) for line in done.stdout.splitlines() if done.exit_code == 0]

    assert runner.invoke(app, ["import-features", str(tmp_path / "h5"), "--layout", "h5", "--store", store,
                               "--model-key", "m"]).exit_code == 0
    for seed in (1, 2, 3):
        trained = runner.invoke(app, ["train", "--store", store, "--epochs", "1", "--batch-size", "16", "--no-sam",
                                      "--features", "image", "--seed", str(seed)])
        assert trained.exit_code == 0, trained.output
    _, runs = sql("SELECT run_id FROM runs ORDER BY created_at")
    newest = runs[-1]["run_id"]
    subquery = "WHERE run_id = (SELECT run_id FROM runs ORDER BY created_at DESC LIMIT 1)"
    _, expected = sql(f"SELECT run_id, sample_id, score FROM scores {subquery} ORDER BY sample_id")
    assert expected and {r["run_id"] for r in expected} == {newest}
    ordered = "SELECT run_id, sample_id, score FROM {} ORDER BY sample_id"
    assert sql(ordered.format("latest_scores")) == (0, expected)
    first = runs[0]["run_id"]
    code, of_first = sql(ordered.format(f"scores_of('{first}')"))
    assert code == 0 and of_first and {r["run_id"] for r in of_first} == {first}

    # the catalog's own view (and catalog.duckdb's) names the newest run's files only
    shards = manifests.read_manifest(Store(Path(store))).of("scores")
    assert {catalog.run_of(s) for s in shards} == {r["run_id"] for r in runs}
    view = catalog.query(Store(Path(store)), "SELECT sql FROM duckdb_views() WHERE view_name = 'latest_scores'"
                         ).column(0)[0].as_py()
    assert [s.path for s in shards if s.path in view] == [s.path for s in shards if catalog.run_of(s) == newest]
    catalog_rows = catalog.query(Store(Path(store)), ordered.format("latest_scores")).to_pylist()
    assert [{**r, "score": pytest.approx(r["score"])} for r in catalog_rows] == expected

    # (Breaking the other runs' files to show they are not read no longer works: since readers check
    # what was committed, a shard changed in place is damage every command names. The file list above
    # is the proof that the view reads the newest run's files only.)


def test_duckdb_scans_every_table_with_bounded_read_ahead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DuckDB builds a registered dataset's scanner itself (pyarrow's defaults read about 2M rows of a score
    file ahead): through `pipeline sql`, `latest_scores`, `scores` and `samples` are scanned through
    `_Bounded.scanner`, whose batches are at most READ_AHEAD's size, not pre-buffered, with each run's
    scores still its own partition (other runs' files skipped unopened)."""
    pytest.importorskip("h5py")
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    import pyarrow.fs as fs
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.stages import sql as sql_stage
    from pipeline.store import catalog
    from pipeline.store import manifest as manifests
    from schemas import SCORES
    from tests.test_import_features import cli_imported_store

    store = cli_imported_store(tmp_path, rows=12)
    runner = CliRunner()
    for seed in (1, 2):
        trained = runner.invoke(app, ["train", "--store", store, "--epochs", "1", "--batch-size", "16", "--no-sam",
                                      "--features", "image", "--seed", str(seed)])
        assert trained.exit_code == 0, trained.output

    monkeypatch.setitem(sql_stage.READ_AHEAD, "batch_size", 7)  # smaller than any file's row group here
    scanned: list[tuple[list[str], list[int]]] = []
    original = sql_stage._Bounded.scanner

    def spy(self: sql_stage._Bounded, **kwargs: object) -> object:
        sizes = [b.num_rows for b in original(self, **kwargs).to_batches()]  # (a second scan, to look at)
        scanned.append(([Path(f).parent.name for f in self.files], sizes))
        # no pre-buffering either (it reads ahead a file's column chunks), and every page's CRC checked
        options = [f.format.default_fragment_scan_options for f in self.get_fragments()]
        assert options and all(not o.pre_buffer and o.page_checksum_verification for o in options)
        return original(self, **kwargs)

    monkeypatch.setattr(sql_stage._Bounded, "scanner", spy)
    for table, folder, files in (("latest_scores", "scores", 1), ("scores", "scores", 2), ("samples", "samples", 1)):
        scanned.clear()
        done = runner.invoke(app, ["sql", f"SELECT count(*) AS n FROM {table}", "--store", store, "--format", "json"])
        assert done.exit_code == 0, done.output
        n = json.loads(done.stdout.splitlines()[0])["n"]
        read = [sizes for folders, sizes in scanned if folders == [folder] * files]  # (`runs` is read too)
        assert len(read) == 1 and sum(read[0]) == n > 7
        assert scanned and all(0 < size <= 7 for _, sizes in scanned for size in sizes)

    # each run's file keeps its run as its partition: a constant filter skips the other run's file unopened
    shards = manifests.read_manifest(Store(Path(store))).of("scores")
    partitioned = ds.FileSystemDataset.from_paths(
        [str(Path(store).resolve() / s.path) for s in shards], schema=SCORES, format=sql_stage._PARQUET,
        filesystem=fs.LocalFileSystem(), partitions=[pc.field("run_id") == catalog.run_of(s) for s in shards])
    bounded = sql_stage._bounded(partitioned)
    for shard in shards:
        kept = list(bounded.get_fragments(filter=pc.field("run_id") == catalog.run_of(shard)))
        assert [Path(f.path).name for f in kept] == [Path(shard.path).name]
