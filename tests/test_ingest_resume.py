"""A grown tar or CSV manifest is read from where the last read stopped; a rewritten one whole."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.sources import common, manifest, webdataset
from pipeline.stages.ingest import IngestConfig
from pipeline.stages.ingest import run as ingest
from pipeline.store import catalog, writes
from pipeline.store.layout import Store


def _image(i: int) -> bytes:
    return f"image {i} ".encode() * 50


def _add(tf: tarfile.TarFile, keys: Iterable[int]) -> None:
    for i in keys:
        for name, data in ((f"{i:06d}.jpg", _image(i)), (f"{i:06d}.txt", f"caption {i}".encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _tar(path: Path, keys: Iterable[int], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:  # "a": appended where the end-of-archive blocks were
        _add(tf, keys)
    return path


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tar members and files whose bytes ingest hashes (the images it reads)."""
    seen: list[str] = []
    tar_hash, file_hash = common.tar_candidate_or_problem, manifest.hash_file

    def in_tar(tar: Path, tf: tarfile.TarFile, member: tarfile.TarInfo, limits: common.Limits) -> object:
        seen.append(member.name)
        return tar_hash(tar, tf, member, limits)

    def in_file(path: Path, limits: common.Limits) -> object:
        seen.append(path.name)
        return file_hash(path, limits)

    monkeypatch.setattr(webdataset, "tar_candidate_or_problem", in_tar)
    monkeypatch.setattr(manifest, "hash_file", in_file)
    return seen


def _ids(store: Store) -> list[str]:
    return catalog.query(store, "SELECT sample_id FROM samples_all").column(0).to_pylist()


def _config(source: Path, store: Store, **kw: object) -> IngestConfig:
    return IngestConfig(source, "webdataset", store, generator="sd-xl", **kw)  # type: ignore[arg-type]


def test_an_appended_tar_is_read_from_where_the_last_read_stopped(tmp_path: Path, hashed: list[str]) -> None:
    tar, store = _tar(tmp_path / "shard.tar", range(6)), Store(tmp_path / "store")
    assert ingest(_config(tar, store)).added == 6
    _tar(tar, range(6, 9), "a")
    hashed.clear()
    grown = ingest(_config(tar, store))
    assert (grown.added, grown.units_read, grown.units_resumed, grown.already_in_store) == (3, 1, 1, 0)
    assert hashed == ["000006.jpg", "000007.jpg", "000008.jpg"]
    ids = _ids(store)
    assert len(ids) == len(set(ids)) == 9
    texts = catalog.query(store, "SELECT text FROM samples ORDER BY text").column(0).to_pylist()
    assert texts == [f"caption {i}" for i in range(9)]
    again = ingest(_config(tar, store))  # unchanged since: not opened
    assert (again.units_read, again.units_skipped) == (0, 1)


@pytest.mark.skipif(shutil.which("tar") is None, reason="no tar command")
def test_tar_r_appends_are_read_alone(tmp_path: Path, hashed: list[str]) -> None:
    tar, store = _tar(tmp_path / "shard.tar", range(4)), Store(tmp_path / "store")
    ingest(_config(tar, store))
    extra = tmp_path / "more"
    extra.mkdir()
    (extra / "000100.jpg").write_bytes(_image(100))
    subprocess.run(["tar", "-rf", str(tar), "-C", str(extra), "000100.jpg"], check=True)
    hashed.clear()
    grown = ingest(_config(tar, store))
    assert (grown.added, grown.units_resumed) == (1, 1) and hashed == ["000100.jpg"]


def test_a_rewritten_tar_is_read_whole(tmp_path: Path, hashed: list[str]) -> None:
    tar, store = _tar(tmp_path / "shard.tar", range(6)), Store(tmp_path / "store")
    ingest(_config(tar, store))
    _tar(tar, [*range(1, 6), 50, 51])  # key 0 replaced at the start: larger, but not an append
    hashed.clear()
    again = ingest(_config(tar, store))
    assert (again.units_resumed, again.added, again.already_in_store) == (0, 2, 5)
    assert len(hashed) == 7
    ids = _ids(store)
    assert len(ids) == len(set(ids)) == 8


def _kill_before_the_last_ledger(monkeypatch: pytest.MonkeyPatch, last: str) -> None:
    """The next ingest dies as it commits the ledger row of `last` (its samples committed)."""
    commit = writes.commit

    def killed(s: Store, files: Iterable[Path]) -> None:
        files = list(files)
        commit(s, [f for f in files if f.parent.name != "sources"])
        ledger = [f for f in files if f.parent.name == "sources"]
        if any(last in r for f in ledger for r in pq.read_table(f).column("source_uri").to_pylist()):
            for f in ledger:
                f.unlink()  # not yet written when the kill came
            monkeypatch.setattr(writes, "commit", commit)
            raise KeyboardInterrupt
        commit(s, ledger)

    monkeypatch.setattr(writes, "commit", killed)


def test_a_kill_between_samples_and_ledger_reads_the_growth_again_without_duplicates(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tar, store = _tar(tmp_path / "shard.tar", range(5)), Store(tmp_path / "store")
    ingest(_config(tar, store, shard_rows=2))
    _tar(tar, range(5, 10), "a")
    _kill_before_the_last_ledger(monkeypatch, "shard.tar")
    with pytest.raises(KeyboardInterrupt):
        ingest(_config(tar, store, shard_rows=2))
    assert len(_ids(store)) == 10  # the samples are in, the tar's ledger row is not
    again = ingest(_config(tar, store, shard_rows=2))
    assert (again.units_resumed, again.added, again.already_in_store) == (1, 0, 5)
    ids = _ids(store)
    assert len(ids) == len(set(ids)) == 10
    assert ingest(_config(tar, store)).units_skipped == 1


def test_a_kill_before_a_manifests_own_ledger_row_skips_the_rows_recorded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hashed: list[str]) -> None:
    for i in range(8):
        (tmp_path / f"img{i}.jpg").write_bytes(_image(i))
    csv, store = tmp_path / "m.csv", Store(tmp_path / "store")
    _csv(csv, range(4))
    ingest(IngestConfig(csv, "manifest", store, shard_rows=2))
    _csv(csv, range(4, 8), "a")
    _kill_before_the_last_ledger(monkeypatch, "m.csv")
    with pytest.raises(KeyboardInterrupt):
        ingest(IngestConfig(csv, "manifest", store, shard_rows=2))
    hashed.clear()
    again = ingest(IngestConfig(csv, "manifest", store, shard_rows=2))
    # rows whose ledger rows were committed before the kill are skipped, the others read again
    assert (again.units_resumed, again.added, again.units_skipped + again.already_in_store) == (1, 0, 4)
    assert len(hashed) == again.already_in_store < 4
    ids = _ids(store)
    assert len(ids) == len(set(ids)) == 8


def _csv(path: Path, rows: range, mode: str = "w") -> None:
    with open(path, mode, encoding="utf-8") as f:
        if mode == "w":
            f.write("path,caption,label,generator\n")
        for i in rows:
            f.write(f'img{i}.jpg,"caption, {i}",1,sd-xl\n')


def test_an_appended_csv_manifest_parses_only_its_new_lines(tmp_path: Path, hashed: list[str]) -> None:
    for i in range(10):
        (tmp_path / f"img{i}.jpg").write_bytes(_image(i))
    csv, store = tmp_path / "m.csv", Store(tmp_path / "store")
    _csv(csv, range(6))
    first = ingest(IngestConfig(csv, "manifest", store))
    assert (first.added, first.units_read) == (6, 7)  # six rows and the manifest itself
    _csv(csv, range(6, 10), "a")
    hashed.clear()
    grown = ingest(IngestConfig(csv, "manifest", store))
    assert (grown.added, grown.units_read, grown.units_skipped, grown.units_resumed) == (4, 5, 0, 1)
    assert hashed == [f"img{i}.jpg" for i in range(6, 10)]
    noop = ingest(IngestConfig(csv, "manifest", store))
    assert (noop.units_read, noop.units_skipped, noop.added) == (0, 1, 0)
    rows = catalog.query(store, "SELECT text FROM samples ORDER BY text").column(0).to_pylist()
    assert rows == sorted(f"caption, {i}" for i in range(10))


def test_a_rewritten_csv_manifest_is_parsed_whole_and_its_old_rows_skipped(tmp_path: Path, hashed: list[str]) -> None:
    for i in range(8):
        (tmp_path / f"img{i}.jpg").write_bytes(_image(i))
    csv, store = tmp_path / "m.csv", Store(tmp_path / "store")
    _csv(csv, range(5))
    ingest(IngestConfig(csv, "manifest", store))
    _csv(csv, range(1, 8))  # a row gone at the start: the bytes before the old end changed
    hashed.clear()
    again = ingest(IngestConfig(csv, "manifest", store))
    assert (again.added, again.units_skipped) == (3, 4)
    assert sorted(hashed) == [f"img{i}.jpg" for i in range(5, 8)]


def test_a_csv_ending_without_a_newline_keeps_no_resume_point(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"img{i}.jpg").write_bytes(_image(i))
    csv, store = tmp_path / "m.csv", Store(tmp_path / "store")
    _csv(csv, range(3))
    with open(csv, "a", encoding="utf-8") as f:
        f.write("img3.jpg,half,1,sd-xl")  # perhaps half written: the next read starts at the top
    assert ingest(IngestConfig(csv, "manifest", store)).added == 4
    kept = catalog.query(store, "SELECT resume_offset FROM sources WHERE resume_offset IS NOT NULL")
    assert kept.num_rows == 0
    with open(csv, "a", encoding="utf-8") as f:
        f.write("_more\n")
    _csv(csv, range(4, 5), "a")
    again = ingest(IngestConfig(csv, "manifest", store))
    assert (again.units_resumed, again.units_skipped, again.added) == (0, 3, 1)  # img3 again: already in
    assert (again.already_in_store, again.units_read) == (1, 3)
    noop = ingest(IngestConfig(csv, "manifest", store))
    assert (noop.units_read, noop.units_skipped) == (0, 1)  # nothing new: no row parsed


def test_a_ledger_written_before_resume_points_still_skips_and_then_resumes(tmp_path: Path, hashed: list[str]) -> None:
    tar, store = _tar(tmp_path / "shard.tar", range(4)), Store(tmp_path / "store")
    ingest(_config(tar, store))
    old = ("resume_offset", "resume_tail", "resume_rows")
    for path in catalog.shard_paths(store, "sources"):  # as an older release wrote it
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(list(old)).replace_schema_metadata(table.schema.metadata), path)
    writes.rebuild(store)
    assert not set(old) & set(pq.read_schema(catalog.shard_paths(store, "sources")[0]).names)
    assert ingest(_config(tar, store)).units_skipped == 1
    _tar(tar, range(4, 6), "a")
    hashed.clear()
    whole = ingest(_config(tar, store))  # no resume point recorded: read whole, old rows already in
    assert (whole.units_resumed, whole.added, whole.already_in_store, len(hashed)) == (0, 2, 4, 6)
    _tar(tar, range(6, 7), "a")
    hashed.clear()
    resumed = ingest(_config(tar, store))  # the ledger has old and new shards: both read
    assert (resumed.units_resumed, resumed.added, hashed) == (1, 1, ["000006.jpg"])
    table = catalog.query(store, "SELECT count(*), count(resume_offset) FROM sources")
    assert table.to_pylist() == [{"count_star()": 3, "count(resume_offset)": 2}]


def test_a_compressed_tar_keeps_no_resume_point(tmp_path: Path) -> None:
    tar = tmp_path / "shard.tar"
    with tarfile.open(tar, "w:gz") as tf:
        _add(tf, range(3))
    store = Store(tmp_path / "store")
    assert ingest(_config(tar, store)).added == 3
    kept = catalog.query(store, "SELECT resume_offset FROM sources").column(0).to_pylist()
    assert kept == [None]


def test_resume_points_read_only_the_window_before_them(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"a" * 200_000)
    point = common.resume_point(path, 150_000)
    assert point is not None and common.resume_holds(path, point)
    with open(path, "r+b") as f:
        f.seek(10)
        f.write(b"b")  # before the window: not looked at (the price of never re-hashing the prefix)
    assert common.resume_holds(path, point)
    with open(path, "r+b") as f:
        f.seek(149_999)
        f.write(b"b")
    assert not common.resume_holds(path, point)
    path.write_bytes(b"a" * 100)
    assert not common.resume_holds(path, point)


def _d3_rows(tmp_path: Path, name: str, rows: int, seed: int) -> pa.Table:
    from pipeline.synthetic import make_d3

    data = make_d3(tmp_path / name, rows=rows, size=16, missing_real=0, broken_generated=0, seed=seed)
    table = pq.read_table(data.parquet)
    ids = pa.array([f"{name}{i}" for i in range(rows)])
    return table.set_column(table.schema.get_field_index("id"), "id", ids)


def test_a_d3_parquet_file_rewritten_with_row_groups_added_reads_only_those(tmp_path: Path) -> None:
    old, new = _d3_rows(tmp_path, "a", 6, 0), _d3_rows(tmp_path, "b", 3, 1)
    path, store = tmp_path / "d3" / "train-0.parquet", Store(tmp_path / "store")
    path.parent.mkdir()
    pq.write_table(old, path, row_group_size=4)
    first = ingest(IngestConfig(path.parent, "d3", store))
    assert first.added == 24 and first.problems == {"real_image_missing": 6}
    with pq.ParquetWriter(path, old.schema) as writer:  # the same row groups, then new ones
        writer.write_table(old, row_group_size=4)
        writer.write_table(new, row_group_size=4)
    grown = ingest(IngestConfig(path.parent, "d3", store))
    assert (grown.units_resumed, grown.added, grown.already_in_store) == (1, 12, 0)
    assert grown.problems == {"real_image_missing": 3}
    rows = catalog.query(store, "SELECT DISTINCT source_row FROM samples ORDER BY 1").column(0).to_pylist()
    assert rows == list(range(9))  # rows numbered from the file's start
    pq.write_table(pa.concat_tables([new, old]), path, row_group_size=4)  # rewritten: read whole
    whole = ingest(IngestConfig(path.parent, "d3", store))
    assert (whole.units_resumed, whole.added, whole.already_in_store) == (0, 0, 36)


@pytest.fixture
def real_hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the real images (files) whose bytes D3 ingest hashes."""
    from pipeline.sources import d3

    seen: list[str] = []
    hash_location = d3.hash_location

    def recorded(loc: object, limits: common.Limits) -> object:
        seen.append(Path(loc.uri).name)  # type: ignore[attr-defined]
        return hash_location(loc, limits)  # type: ignore[arg-type]

    monkeypatch.setattr(d3, "hash_location", recorded)
    return seen


def _real_images_away(data: object, names: list[str], away: Path) -> None:
    away.mkdir()
    for name in names:
        shutil.move(data.real_images / name, away / name)  # type: ignore[attr-defined]


def _missing_status(store: Store) -> dict[str, int]:
    from pipeline.stages.status import StatusConfig
    from pipeline.stages.status import run as status

    table = status(StatusConfig(store)).quarantine_by_reason
    return {r["reason"]: r["inputs"] for r in table.to_pylist()}


def test_a_grown_real_images_folder_reads_no_parquet_file_and_adds_the_images_now_found(
        tmp_path: Path, real_hashed: list[str]) -> None:
    from pipeline.sources.d3 import split_from_path
    from pipeline.synthetic import make_d3

    data = make_d3(tmp_path / "src", rows=8, size=16, missing_real=0, broken_generated=0)
    away = tmp_path / "later"
    _real_images_away(data, ["000002.jpg", "000005.jpg", "000007.jpg"], away)
    store = Store(tmp_path / "store")
    first = ingest(IngestConfig(data.parquet, "d3", store, real_images=data.real_images))
    assert first.added == 8 * 4 + 5 and first.problems == {"real_image_missing": 3}
    assert first.rechecked == 0  # this run's missing rows were looked up in this index already
    assert _missing_status(store) == {"real_image_missing": 3}
    shutil.move(away / "000002.jpg", data.real_images / "000002.jpg")  # two of the three arrive
    shutil.move(away / "000005.jpg", data.real_images / "000005.jpg")
    real_hashed.clear()
    grown = ingest(IngestConfig(data.parquet, "d3", store, real_images=data.real_images))
    assert (grown.units_read, grown.units_skipped, grown.rechecked) == (0, 1, 3)  # the file is not read
    assert grown.resolved == {"real_image_missing": 2} and grown.problems == {}
    assert grown.added == 2 and sorted(real_hashed) == ["000002.jpg", "000005.jpg"]
    assert _missing_status(store) == {"real_image_missing": 1}
    found = catalog.query(store, """
        SELECT r.group_key, r.text, r.split, r.label, g.split AS generated_split FROM samples r
        JOIN (SELECT DISTINCT group_key, split FROM samples WHERE label = 1) g USING (group_key)
        WHERE r.label = 0 AND r.source_uri LIKE '%00000_.jpg' AND r.group_key IN ('d3:000002', 'd3:000005')
        ORDER BY 1""").to_pylist()
    prompts = dict(zip(*pq.read_table(data.parquet, columns=["id", "original_prompt"]).to_pydict().values(),
                       strict=True))
    assert [r["group_key"] for r in found] == ["d3:000002", "d3:000005"]
    for r in found:  # as if read with the file: its caption, and the split of its group
        assert r["text"] == prompts[r["group_key"][3:]] and r["split"] == r["generated_split"]
    assert split_from_path(data.parquet) is None
    real_hashed.clear()
    same = ingest(IngestConfig(data.parquet, "d3", store, real_images=data.real_images))
    assert (same.units_read, same.rechecked, same.added, real_hashed) == (0, 0, 0, [])  # a no-op
    shutil.move(away / "000007.jpg", data.real_images / "000007.jpg")
    last = ingest(IngestConfig(data.parquet, "d3", store, real_images=data.real_images))
    assert (last.rechecked, last.resolved, last.added) == (1, {"real_image_missing": 1}, 1)  # resolved: not again
    assert real_hashed == ["000007.jpg"] and _missing_status(store) == {}
    ids = _ids(store)
    assert len(ids) == len(set(ids)) == 8 * 5


def test_a_kill_before_the_real_images_folders_ledger_row_adds_nothing_twice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real_hashed: list[str]) -> None:
    from pipeline.synthetic import make_d3

    data = make_d3(tmp_path / "src", rows=6, size=16, missing_real=0, broken_generated=0)
    away = tmp_path / "later"
    _real_images_away(data, ["000001.jpg", "000003.jpg", "000004.jpg"], away)
    store = Store(tmp_path / "store")
    ingest(IngestConfig(data.parquet, "d3", store, real_images=data.real_images))
    for name in ("000001.jpg", "000003.jpg", "000004.jpg"):
        shutil.move(away / name, data.real_images / name)
    _kill_before_the_last_ledger(monkeypatch, str(data.real_images))
    with pytest.raises(KeyboardInterrupt):
        ingest(IngestConfig(data.parquet, "d3", store, real_images=data.real_images, shard_rows=2))
    assert len(_ids(store)) == 6 * 5  # the samples and their resolutions are in; the folder's row is not
    real_hashed.clear()
    again = ingest(IngestConfig(data.parquet, "d3", store, real_images=data.real_images, shard_rows=2))
    assert (again.units_read, again.rechecked, again.added, real_hashed) == (0, 0, 0, [])
    assert _missing_status(store) == {}
    doubled = catalog.query(store, "SELECT count(*) - count(DISTINCT (reason, source_row)) FROM quarantine")
    assert doubled.column(0)[0].as_py() == 0
    ids = _ids(store)
    assert len(ids) == len(set(ids)) == 6 * 5


def test_a_d3_file_grown_with_the_real_images_looks_up_only_the_old_rows_again(tmp_path: Path) -> None:
    from pipeline.synthetic import make_d3

    data = make_d3(tmp_path / "src", rows=8, size=16, missing_real=0, broken_generated=0, row_group_size=4)
    table = pq.read_table(data.parquet)
    away = tmp_path / "later"
    _real_images_away(data, ["000001.jpg", "000006.jpg"], away)
    path, store = tmp_path / "d3" / "train-0.parquet", Store(tmp_path / "store")
    path.parent.mkdir()
    pq.write_table(table.slice(0, 4), path, row_group_size=4)
    first = ingest(IngestConfig(path.parent, "d3", store, real_images=data.real_images, splits_from="source"))
    assert first.problems == {"real_image_missing": 1}
    with pq.ParquetWriter(path, table.schema) as writer:  # row 6's image still away, row 1's back
        writer.write_table(table, row_group_size=4)
    shutil.move(away / "000001.jpg", data.real_images / "000001.jpg")
    grown = ingest(IngestConfig(path.parent, "d3", store, real_images=data.real_images, splits_from="source"))
    assert (grown.units_resumed, grown.rechecked, grown.resolved) == (1, 1, {"real_image_missing": 1})
    assert grown.added == 4 * 4 + 3 + 1 and grown.problems == {"real_image_missing": 1}
    assert _missing_status(store) == {"real_image_missing": 1}
    split = catalog.query(store, "SELECT DISTINCT split FROM samples").column(0).to_pylist()
    assert split == ["train"]  # the found image takes the split the file declares (--splits source)
