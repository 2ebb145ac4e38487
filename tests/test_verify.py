"""`pipeline verify`: every shard read in full; damage named in one sentence everywhere;
`--repair` moves damaged shards aside and the next encode recomputes exactly what was lost."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import PipelineError
from pipeline.stages import encode, verify
from pipeline.store import catalog, writes
from pipeline.store.layout import Store
from schemas import version_of
from tests.conftest import encode_config


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path, at: float = 0.3) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i : i + 64] = bytes(b ^ 0xFF for b in data[i : i + 64])
    path.write_bytes(bytes(data))


def _restamp(path: Path, table: str | None = None, version: int | None = None) -> None:
    t = pq.read_table(path)
    meta = dict(t.schema.metadata)
    if table is not None:
        meta[b"pipeline.table"] = table.encode()
    if version is not None:
        meta[b"pipeline.schema_version"] = str(version).encode()
    pq.write_table(t.replace_schema_metadata(meta), path)


def _vectors(store: Store) -> dict[str, list[float]]:
    rows = catalog.query(store, "SELECT modality || content_hash AS k, vector FROM embeddings").to_pylist()
    return {r["k"]: r["vector"] for r in rows}


def test_healthy_store_verifies(d3_store: Store) -> None:
    encode.run(encode_config(d3_store))
    result = verify.run(verify.VerifyConfig(d3_store))
    assert result.healthy and result.shards_checked >= 3
    assert result.rows_checked >= 59


@pytest.mark.parametrize("damage", [_truncate, _flip])
def test_damaged_embedding_shard_is_named_and_repair_recomputes_exactly_it(d3_store: Store, damage) -> None:
    encode.run(encode_config(d3_store))
    before = _vectors(d3_store)
    shard = catalog.shard_paths(d3_store, "embeddings")[0]
    rel = d3_store.relative(shard)
    damage(shard)
    if damage is _truncate:  # readers meet it (a flipped bit in a page only a checksum finds: verify)
        with pytest.raises(PipelineError, match=rf"Shard {rel} is damaged .*pipeline verify --repair"):
            catalog.query(Store(d3_store.root), "SELECT count(*) FROM embeddings")  # (a new command)
    result = verify.run(verify.VerifyConfig(d3_store))
    assert [d.path for d in result.damaged] == [rel]
    repaired = verify.run(verify.VerifyConfig(d3_store, repair=True))
    assert rel in repaired.repaired and (d3_store.root / "damaged" / rel).exists()
    assert verify.run(verify.VerifyConfig(d3_store)).healthy
    lost = len(before) - len(_vectors(d3_store))
    assert lost > 0
    again = encode.run(encode_config(d3_store))
    assert again.images_encoded + again.texts_encoded == lost
    assert _vectors(d3_store) == before  # bit-identical, nothing doubled
    reasons = catalog.query(d3_store, "SELECT reason FROM quarantine WHERE stage = 'verify'").column(0).to_pylist()
    assert reasons == ["damaged_shard"]


def test_shard_of_another_schema_version_is_named(d3_store: Store) -> None:
    shard = catalog.shard_paths(d3_store, "samples")[0]
    _restamp(shard, version=version_of("samples") + 1)
    with pytest.raises(PipelineError, match=r"schema version .*pipeline verify --repair"):
        catalog.query(Store(d3_store.root), "SELECT count(*) FROM samples")  # (a new command)
    damaged = verify.run(verify.VerifyConfig(d3_store)).damaged
    assert len(damaged) == 1 and "version" in damaged[0].problem


def test_rebuild_with_a_bad_shard_keeps_views_over_the_healthy_ones(d3_store: Store) -> None:
    encode.run(encode_config(d3_store))
    n_embeddings = catalog.query(d3_store, "SELECT count(*) FROM embeddings").column(0)[0].as_py()
    bad = catalog.shard_paths(d3_store, "samples")[0]
    _truncate(bad)
    result = writes.rebuild(d3_store)
    assert d3_store.relative(bad) in result.ignored
    # samples of the bad shard are gone from the views, every other table reads
    assert catalog.query(d3_store, "SELECT count(*) FROM samples").column(0)[0].as_py() == 0
    assert catalog.query(d3_store, "SELECT count(*) FROM embeddings").column(0)[0].as_py() == n_embeddings
    listed = verify.run(verify.VerifyConfig(d3_store)).damaged
    assert [d.path for d in listed] == [d3_store.relative(bad)] and not listed[0].committed


def test_a_file_stamped_as_another_table_is_not_registered(d3_store: Store) -> None:
    shard = catalog.shard_paths(d3_store, "quarantine")[0]
    stray = d3_store.dataset_dir("samples") / "stray.parquet"
    stray.write_bytes(shard.read_bytes())  # a quarantine shard dropped among the samples
    result = writes.rebuild(d3_store)
    assert "samples/stray.parquet" in result.ignored
    assert catalog.query(d3_store, "SELECT count(*) FROM samples").column(0)[0].as_py() == 59


def test_a_foreign_file_in_samples_blocks_nothing(d3_store: Store) -> None:
    (d3_store.dataset_dir("samples") / "notes.parquet").write_bytes(b"not parquet at all")
    pa.table({"x": [1]})  # (readers and writers alike go on)
    with catalog_writer(d3_store):
        pass
    assert catalog.query(d3_store, "SELECT count(*) FROM samples").column(0)[0].as_py() == 59


def catalog_writer(store: Store):  # noqa: ANN201 - small helper
    from pipeline.store.writes import writing

    return writing(store)


def test_repairing_a_samples_shard_lets_the_next_ingest_restore_exactly_it(tmp_path: Path) -> None:
    from pipeline.stages.ingest import IngestConfig
    from pipeline.stages.ingest import run as ingest
    from pipeline.synthetic import make_d3

    data = make_d3(tmp_path / "src", rows=8, size=32)
    store = Store(tmp_path / "store")
    config = IngestConfig(data.parquet, "d3", store, real_images=data.real_images, shard_rows=10)
    ingest(config)
    before = catalog.query(store, "SELECT sample_id FROM samples ORDER BY 1").column(0).to_pylist()
    shard = catalog.shard_paths(store, "samples")[1]
    _truncate(shard)
    with pytest.raises(PipelineError, match=r"pipeline verify --repair"):
        ingest(config)
    verify.run(verify.VerifyConfig(store, repair=True))
    assert len(catalog.query(store, "SELECT sample_id FROM samples").column(0)) < len(before)
    again = ingest(config)  # the ledger was reset with the repair: the source is read again
    assert again.units_read == 1 and again.added == 10
    assert catalog.query(store, "SELECT sample_id FROM samples ORDER BY 1").column(0).to_pylist() == before


def _cli(*args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    return result.exit_code, " ".join(result.output.split())


def test_a_doubled_store_is_named_by_verify_and_rebuild_and_undone_by_repair(d3_store: Store) -> None:
    """Two writers at once (a lock file removed under its holder) could commit the same rows twice:
    verify, catalog rebuild and verify --repair must see it (issue 19 item 3)."""
    import shutil

    encode.run(encode_config(d3_store))
    root = str(d3_store.root)
    vectors = _vectors(d3_store)
    sample = catalog.shard_paths(d3_store, "samples")[0]
    embedded = catalog.shard_paths(d3_store, "embeddings")[-1]
    shutil.copy(sample, sample.with_name("samples-9999999999999-00000000.parquet"))
    shutil.copy(embedded, embedded.with_name("zz-copy.parquet"))
    rc, out = _cli("catalog", "rebuild", "--store", root)  # (adopts the copies, as any writer would)
    n_samples = pq.read_metadata(sample).num_rows
    n_vectors = pq.read_metadata(embedded).num_rows
    assert rc == 0 and f"doubled: {n_samples} rows of samples" in out and f"{n_vectors} rows of embeddings" in out, out
    rc, out = _cli("verify", "--store", root)
    assert rc == 1 and f"doubled: {n_samples} rows of samples" in out and "verify --repair" in out, out
    rc, out = _cli("verify", "--repair", "--store", root)
    assert rc == 0 and "kept one of each: 1 shards rewritten" in out, out
    store = Store(d3_store.root)
    counts = catalog.query(store, "SELECT count(*) AS n, count(DISTINCT sample_id) AS d FROM samples").to_pylist()
    assert counts == [{"n": 59, "d": 59}]
    assert _vectors(store) == vectors
    assert catalog.query(store, "SELECT count(*) FROM embeddings").column(0)[0].as_py() == len(vectors)
    rc, out = _cli("verify", "--store", root)
    assert rc == 0 and "no damage found" in out, out


def test_a_deleted_samples_shard_is_damage_until_repaired_and_ingest_brings_it_back(tmp_path: Path) -> None:
    """Issue 19 item 4, its sequence through the command: before, the lock's reconcile forgot the shard,
    `verify --repair` found no damage, ingest read nothing (ledger) and the samples were lost for good."""
    from pipeline.synthetic import make_d3

    data = make_d3(tmp_path / "src", rows=8, size=32)
    root = str(tmp_path / "store")
    ingest = ("ingest", str(data.parquet), "--format", "d3", "--real-images", str(data.real_images),
              "--store", root)
    assert _cli(*ingest)[0] == 0
    store = Store(Path(root))
    before = catalog.query(store, "SELECT sample_id FROM samples ORDER BY 1").column(0).to_pylist()
    catalog.shard_paths(store, "samples")[0].unlink()
    for args in (("status",), ("sql", "SELECT count(*) FROM samples"), ("encode", "--model", "Tiny-ViT-16")):
        rc, out = _cli(*args, "--store", root)
        assert rc == 2 and "the file is missing" in out and "verify --repair" in out, (args, out)
    rc, out = _cli("index", "build", "--store", root)  # a writer: its reconcile keeps the shard named
    assert rc == 2 and "the file is missing" in out, out
    rc, out = _cli("verify", "--repair", "--store", root)
    assert rc == 0 and "missing" in out and "moved" in out, out  # (the table wraps its cells)
    rc, out = _cli(*ingest)
    assert rc == 0, out
    assert catalog.query(Store(Path(root)), "SELECT sample_id FROM samples ORDER BY 1").column(0).to_pylist() == before


def test_a_folder_that_is_not_a_store_is_never_made_one(tmp_path: Path) -> None:
    """Issue 19 item 11: `catalog rebuild --store DIR` made any folder a store, and `verify --repair`
    then moved the user's own Parquet files into DIR/damaged/."""
    folder = tmp_path / "my-data"
    (folder / "samples").mkdir(parents=True)
    pq.write_table(pa.table({"x": [1, 2]}), folder / "mine.parquet")
    pq.write_table(pa.table({"y": [3]}), folder / "samples" / "theirs.parquet")
    before = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    for args in (("catalog", "rebuild"), ("verify", "--repair"), ("verify",), ("index", "build"),
                 ("encode", "--model", "Tiny-ViT-16")):
        rc, out = _cli(*args, "--store", str(folder))
        assert rc == 2 and ("is not a store" in out or "No store at" in out), (args, out)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == before
    rc, out = _cli("train", "--store", str(tmp_path / "typo"))
    assert rc == 2 and not (tmp_path / "typo").exists(), out


def _flip_in_place(path: Path, column: int = 0) -> None:
    """Flip one bit inside a data page of `column`, in place, and put the modification time back: size,
    mtime and inode stay those committed (issue 19 item 5)."""
    import os

    col = pq.ParquetFile(path).metadata.row_group(0).column(column)
    at = col.data_page_offset + col.total_compressed_size // 2
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_a_bit_flipped_in_place_reaches_no_reader(d3_store: Store) -> None:
    """Before: status, sql and train ran (rc 0) on a shard flipped in place with its mtime put back,
    and sql returned a changed sample_id; only verify saw it."""
    encode.run(encode_config(d3_store))
    root = str(d3_store.root)
    _flip_in_place(catalog.shard_paths(d3_store, "samples")[0])
    for args in (("status",), ("sql", "SELECT sample_id FROM samples ORDER BY 1"),
                 ("train", "--epochs", "1", "--batch-size", "16")):
        rc, out = _cli(*args, "--store", root)
        assert rc == 2 and "is damaged" in out and "CRC" in out and "verify --repair" in out, (args, out)


def test_a_flipped_vector_page_stops_training(d3_store: Store) -> None:
    encode.run(encode_config(d3_store))
    vectors = next(p for p in catalog.shard_paths(d3_store, "embeddings") if p.name.startswith("image"))
    names = pq.read_schema(vectors).names
    _flip_in_place(vectors, names.index("vector"))
    rc, out = _cli("train", "--epochs", "1", "--batch-size", "16", "--store", str(d3_store.root))
    assert rc == 2 and "is damaged" in out and vectors.name in out.replace(" ", ""), out  # (wrapped)


def test_a_copied_or_chmodded_store_still_reads_and_is_checked_once(d3_store: Store, tmp_path: Path) -> None:
    import os
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(d3_store.root, copy, copy_function=shutil.copy2)  # cp -a: new inodes, same times
    for shard in catalog.shard_paths(d3_store, "samples"):
        os.chmod(shard, 0o640)  # the change time moves, the bytes do not
    for root in (copy, d3_store.root):
        assert catalog.query(Store(root), "SELECT count(*) FROM samples").column(0)[0].as_py() == 59
        checked = root / "cache" / "checked" / "checked.json"
        assert checked.exists()  # the next command reads nothing for these shards
    with writes.writing(Store(copy)):  # a writer records the new inodes and times in the manifest
        pass
    manifest = (copy / "manifest.json").read_text()
    assert all(str(p.stat().st_ino) in manifest for p in catalog.shard_paths(Store(copy), "samples"))


def test_a_bit_flipped_in_a_copy_after_its_first_read_reaches_no_reader(d3_store: Store, tmp_path: Path) -> None:
    """A copy (new inodes) is checked by its footers at its first read; a bit flipped in place after
    that (mtime put back) is seen by the next reader through the page CRCs."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(d3_store.root, copy, copy_function=shutil.copy2)
    rc, _ = _cli("status", "--store", str(copy))
    assert rc == 0
    _flip_in_place(catalog.shard_paths(Store(copy), "samples")[0])
    rc, out = _cli("sql", "SELECT sample_id FROM samples ORDER BY 1", "--store", str(copy))
    assert rc == 2 and "is damaged" in out and "CRC" in out, out


def test_a_format_1_manifest_reads_and_the_next_writer_fills_in_the_digests(d3_store: Store) -> None:
    import json

    data = json.loads(d3_store.manifest_path.read_text())
    data["format"] = 1
    for shard in data["shards"].values():
        for key in ("inode", "ctime_ns", "digest"):
            shard.pop(key)
    d3_store.manifest_path.write_text(json.dumps(data))
    assert catalog.query(Store(d3_store.root), "SELECT count(*) FROM samples").column(0)[0].as_py() == 59
    with writes.writing(Store(d3_store.root)):
        pass
    data = json.loads(d3_store.manifest_path.read_text())
    assert data["format"] == 2 and all(s.get("digest") for s in data["shards"].values())
