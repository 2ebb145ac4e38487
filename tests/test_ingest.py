"""Every source format; dedup by content; group-consistent splits; missing inputs reported."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import PipelineError
from pipeline.sources.ledger import assign_split
from pipeline.sources.locations import Location
from pipeline.stages.ingest import IngestConfig
from pipeline.stages.ingest import run as ingest
from pipeline.store import catalog
from pipeline.store.layout import Store
from pipeline.synthetic import SyntheticD3, make_d3
from tests.conftest import jpeg


def _samples(store: Store) -> list[dict]:
    return catalog.query(store, "SELECT * FROM samples ORDER BY sample_id").to_pylist()


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_d3_parquet_gives_four_generated_and_one_real_per_row(d3: SyntheticD3, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    result = ingest(IngestConfig(d3.parquet, "d3", store, real_images=d3.real_images))
    rows = _samples(store)
    assert result.added == len(rows) == 12 * 4 + 11  # the last row's real image is missing
    assert result.problems == {"real_image_missing": 1}
    missing = catalog.query(store, "SELECT * FROM quarantine").to_pylist()
    assert [m["reason"] for m in missing] == ["real_image_missing"] and "000011" in missing[0]["detail"]
    real = [r for r in rows if r["label"] == 0]
    assert {r["generator"] for r in real} == {"real"}
    assert all(r["text"].startswith("Photo of") for r in real)  # original caption
    fake = [r for r in rows if r["label"] == 1]
    assert len({r["generator"] for r in fake}) == 4
    assert all("artstation" in r["text"] for r in fake)  # generation prompt
    # one group per D3 row, and every member of a group in one split
    by_group: dict[str, set[str]] = {}
    for r in rows:
        by_group.setdefault(r["group_key"], set()).add(r["split"])
    assert len(by_group) == 12 and all(len(s) == 1 for s in by_group.values())


def test_reingesting_adds_nothing_and_records_no_new_problems(d3: SyntheticD3, d3_store: Store) -> None:
    before = _samples(d3_store)
    again = ingest(IngestConfig(d3.parquet, "d3", d3_store, real_images=d3.real_images))
    assert again.added == 0 and again.units_skipped == 1 and again.units_read == 0  # not even opened
    # other options (a split salt) decide other rows: the file is read again, and still adds nothing
    reread = ingest(IngestConfig(d3.parquet, "d3", d3_store, real_images=d3.real_images, split_seed="1"))
    assert reread.units_read == 1 and reread.added == 0 and reread.already_in_store == len(before)
    assert _samples(d3_store) == before
    assert catalog.query(d3_store, "SELECT count(*) FROM quarantine").column(0)[0].as_py() == 1


def test_an_unchanged_source_is_skipped_even_after_a_copy(d3: SyntheticD3, d3_store: Store) -> None:
    import os
    import shutil

    copy = d3.parquet.with_name("copy.parquet")
    shutil.copyfile(d3.parquet, copy)
    os.replace(copy, d3.parquet)  # same bytes, new inode and modification time: the footer digest matches
    again = ingest(IngestConfig(d3.parquet, "d3", d3_store, real_images=d3.real_images))
    assert again.units_skipped == 1 and again.units_read == 0


def test_a_grown_folder_costs_only_its_new_files(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    (root / "real").mkdir(parents=True)
    (root / "sdxl").mkdir()
    for i in range(4):
        (root / "real" / f"{i}.jpg").write_bytes(jpeg((10 * i, 2, 3)))
        (root / "sdxl" / f"{i}.png").write_bytes(jpeg((10 * i, 200, 3), fmt="PNG"))
    store = Store(tmp_path / "store")
    assert ingest(IngestConfig(root, "folder", store)).added == 8
    (root / "sdxl" / "9.png").write_bytes(jpeg((99, 99, 99), fmt="PNG"))
    grown = ingest(IngestConfig(root, "folder", store))
    assert (grown.units_read, grown.units_skipped, grown.added) == (1, 8, 1)
    (root / "real" / "0.txt").write_text("a caption written later")  # a changed sidecar: that image again
    again = ingest(IngestConfig(root, "folder", store))
    assert (again.units_read, again.already_in_store) == (1, 1)


def test_the_store_is_scanned_once_per_run_not_once_per_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from pipeline.store import keys

    root = tmp_path / "imgs"
    (root / "real").mkdir(parents=True)
    for i in range(6):
        (root / "real" / f"{i}.jpg").write_bytes(jpeg((10 * i, 2, 3)))
    (root / "real" / "bad.jpg").symlink_to(tmp_path / "nowhere.jpg")  # unreadable: quarantined
    store = Store(tmp_path / "store")
    ingest(IngestConfig(root, "folder", store))
    (root / "sdxl").mkdir()
    for i in range(9):
        (root / "sdxl" / f"{i}.png").write_bytes(jpeg((10 * i, 200, 3), fmt="PNG"))
    (root / "sdxl" / "copy.jpg").write_bytes((root / "real" / "2.jpg").read_bytes())  # a label conflict
    (root / "sdxl" / "twin.png").write_bytes((root / "sdxl" / "3.png").read_bytes())  # a duplicate
    scans: list[keys.KeyQuery] = []
    real = keys._scan
    monkeypatch.setattr(keys, "_scan", lambda query, paths, scratch: scans.append(query) or real(
        query, paths, scratch))
    shutil.rmtree(store.root / "cache" / "keys")  # no key sets kept from the first ingest: each built once
    result = ingest(IngestConfig(root, "folder", store, shard_rows=2))  # a commit every two images
    assert len(scans) == len(set(scans)) == 3  # the ledger, sample ids, quarantined inputs: once each
    assert (result.added, result.units_read, result.units_skipped) == (9, 11, 7)
    assert (result.label_conflicts, result.duplicates_in_source) == (1, 1)
    ids = catalog.query(store, "SELECT sample_id FROM samples_all").column(0).to_pylist()
    assert len(ids) == len(set(ids)) == 6 + 9
    again = ingest(IngestConfig(root, "folder", store, split_seed="1", shard_rows=2))  # every file read again
    assert again.added == 0 and again.already_in_store == 6 + 9 + 1 and again.problems["label_conflict"] == 1
    assert catalog.query(store, "SELECT count(*) FROM quarantine").column(0)[0].as_py() == 2  # not recorded twice


def test_d3_generator_names_are_canonical_and_the_original_kept(d3_store: Store) -> None:
    rows = catalog.query(d3_store, "SELECT DISTINCT generator, generator_original FROM samples "
                                   "WHERE label = 1 ORDER BY 1").to_pylist()
    assert [r["generator"] for r in rows] == ["deepfloyd-if", "sd-1.4", "sd-2.1", "sd-xl"]
    assert {r["generator_original"] for r in rows} == {
        "CompVis/stable-diffusion-v1-4", "stabilityai/stable-diffusion-2-1-base",
        "stabilityai/stable-diffusion-xl-base-1.0", "DeepFloyd/IF-I-M-v1.0"}


def test_d3_webdataset_and_parquet_forms_agree(tmp_path: Path) -> None:
    """The same D3 row in both forms: one group key, and gen_k named as the Parquet's model_gen{k}."""
    data = make_d3(tmp_path / "src", rows=2, size=32, missing_real=0, broken_generated=0)
    table = pq.read_table(data.parquet).to_pylist()
    members = {}
    for row in table:
        key = f"elsa_v2__validation__{row['id']}"
        for k in range(4):
            members[f"{key}.gen_{k}.png"] = row[f"image_gen{k}"]["bytes"]
        members[f"{key}.real.jpg"] = (data.real_images / f"{row['id']}.jpg").read_bytes()
        members[f"{key}.caption.txt"] = row["original_prompt"].encode()
    tar = _tar(tmp_path / "elsa_v2-0000.tar", members)
    from_parquet, from_tar = Store(tmp_path / "p"), Store(tmp_path / "w")
    ingest(IngestConfig(data.parquet, "d3", from_parquet, real_images=data.real_images))
    order = tuple(table[0][f"model_gen{k}"] for k in range(4))  # HF ids: mapped to canonical names
    ingest(IngestConfig(tar, "d3", from_tar, splits_from="source", generators=order))
    sql = "SELECT sample_id, generator, group_key FROM samples ORDER BY sample_id"
    assert catalog.query(from_parquet, sql).to_pylist() == catalog.query(from_tar, sql).to_pylist()
    assert set(catalog.query(from_tar, "SELECT DISTINCT split FROM samples").column(0).to_pylist()) == {"val"}
    # the webdataset form into the store of the Parquet form: right names agree, wrong ones are reported
    agree = ingest(IngestConfig(tar, "d3", from_parquet, generators=order))
    assert agree.already_in_store == 10 and not agree.generator_mismatches
    rotated = order[1:] + order[:1]
    wrong = ingest(IngestConfig(tar, "d3", from_parquet, generators=rotated))
    assert sum(wrong.generator_mismatches.values()) == 8 and wrong.added == 0
    [warning] = wrong.generator_warnings  # the order itself, before the bytes were compared
    assert "pass --generators deepfloyd-if,sd-2.1,sd-xl,sd-1.4" in warning


def test_splits_source_keeps_d3_file_splits(tmp_path: Path) -> None:
    data = make_d3(tmp_path / "src", rows=4, size=32, missing_real=0, broken_generated=0)
    (tmp_path / "d3" / "test").mkdir(parents=True)
    data.parquet.rename(tmp_path / "d3" / "test" / "0000.parquet")
    store = Store(tmp_path / "store")
    ingest(IngestConfig(tmp_path / "d3", "d3", store, real_images=data.real_images, splits_from="source"))
    assert catalog.query(store, "SELECT DISTINCT split FROM samples").column(0).to_pylist() == ["test"]


def test_d3_real_images_matched_by_url_in_img2dataset_tar(tmp_path: Path) -> None:
    data = make_d3(tmp_path / "src", rows=3, size=32, missing_real=0, broken_generated=0)
    members = {}
    for i, path in enumerate(sorted(data.real_images.glob("*.jpg"))):
        key = f"{i:09d}"  # img2dataset keys do not match D3 ids: the URL must
        members[f"00000/{key}.jpg"] = path.read_bytes()
        members[f"00000/{key}.json"] = json.dumps({"url": f"https://example.invalid/laion/{path.stem}.jpg"}).encode()
    tar = _tar(tmp_path / "laion.tar", members)
    store = Store(tmp_path / "store")
    result = ingest(IngestConfig(data.parquet, "d3", store, real_images=tar))
    assert result.problems == {} and result.by_split.total() == 15
    real = catalog.query(store, "SELECT * FROM samples WHERE label = 0").to_pylist()
    assert len(real) == 3 and all(r["byte_offset"] is not None for r in real)


def test_real_image_index_is_kept_in_the_store_and_built_again_only_when_the_folder_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.sources import real_images

    builds: list[Path] = []
    build = real_images._build
    monkeypatch.setattr(real_images, "_build", lambda root, d: builds.append(d) or build(root, d))
    data = make_d3(tmp_path / "src", rows=4, size=32, missing_real=1, broken_generated=0)
    store = Store(tmp_path / "store")
    first = ingest(IngestConfig(data.parquet, "d3", store, real_images=data.real_images))
    assert first.problems == {"real_image_missing": 1} and len(builds) == 1
    cache = store.root / "cache" / "real-images"
    assert [p.name for p in cache.iterdir()] == [builds[0].name]
    index = real_images.RealImageIndex(data.real_images, cache)  # the folder as it was: found, not built
    assert len(builds) == 1 and len(index) == 3
    assert index.find("000001", None) == Location(uri=str(data.real_images / "000001.jpg"))
    assert index.find("nope", "https://nowhere") is None
    shutil.copy(data.real_images / "000000.jpg", data.real_images / "000003.jpg")  # the missing one arrives
    (data.real_images / "000003.json").write_text(json.dumps({"url": "https://example.invalid/x.jpg"}))
    again = ingest(IngestConfig(data.parquet, "d3", store, real_images=data.real_images))
    # the file is not read again: its one missing row is looked up in the new index, and found
    assert len(builds) == 2 and again.units_read == 0 and again.problems == {}
    assert again.rechecked == 1 and again.resolved == {"real_image_missing": 1}
    assert [p.name for p in cache.iterdir()] == [builds[1].name]  # the index of the old state is gone
    index = real_images.RealImageIndex(data.real_images, cache)
    assert index.find(None, "https://example.invalid/x.jpg") == index.find("000003", None) is not None


def test_real_image_index_first_of_an_id_wins_and_tars_are_indexed(tmp_path: Path) -> None:
    from pipeline.sources.real_images import RealImageIndex

    root = tmp_path / "real"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "7.jpg").write_bytes(b"first")
    (root / "b" / "7.jpg").write_bytes(b"second")
    _tar(root / "b" / "shard.tar", {"00/k1.jpg": b"in tar", "00/k1.json": b'{"url": "u1"}', "00/k2.txt": b"x"})
    index = RealImageIndex(root)  # no store: a temporary index
    assert index.find("7", None) == Location(uri=str(root / "a" / "7.jpg"))
    found = index.find("zzz", "u1")
    assert found is not None and found.member == "00/k1.jpg" and found.length == 6
    assert index.find("k1", None) == found and len(index) == 2  # b/7.jpg is hidden by a/7.jpg


def test_d3_with_img_url_column(tmp_path: Path) -> None:
    data = make_d3(tmp_path / "src", rows=2, size=32, missing_real=0, broken_generated=0)
    table = pq.read_table(data.parquet).rename_columns(
        [("img_url" if c == "url" else c) for c in pq.read_schema(data.parquet).names]
    )
    pq.write_table(table, data.parquet)
    result = ingest(IngestConfig(data.parquet, "d3", Store(tmp_path / "s"), real_images=data.real_images))
    assert result.added == 10


def test_d3_parquet_missing_columns_is_one_sentence(tmp_path: Path) -> None:
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["1"]}), bad)
    with pytest.raises(PipelineError, match="not in the D3 layout: it lacks image_gen0"):
        ingest(IngestConfig(bad, "d3", Store(tmp_path / "s")))


def test_d3_webdataset_form(tmp_path: Path) -> None:
    members = {}
    for k, key in enumerate(["a1", "a2"]):
        members[f"{key}.real.jpg"] = jpeg((10 + k, 20, 30))
        for g in range(4):
            members[f"{key}.gen_{g}.jpg"] = jpeg((100 + 10 * g + k, 50, 50))
        members[f"{key}.caption.txt"] = f"caption {key}".encode()
        members[f"{key}.url.txt"] = f"https://x/{key}".encode()
    tar = _tar(tmp_path / "d3-000.tar", members)
    store = Store(tmp_path / "store")
    result = ingest(IngestConfig(tar, "d3", store))
    assert result.added == 10 and result.generator_warnings == []
    rows = _samples(store)
    assert {r["generator"] for r in rows} == {"real", "sd-1.4", "sd-2.1", "sd-xl", "deepfloyd-if"}
    slots = catalog.query(store, "SELECT DISTINCT generator_original, generator FROM samples WHERE label = 1")
    # D3's model_gen0..3 (record 1275001022128): DeepFloyd/IF-I-M-v1.0, SD 2.1, SD XL base 1.0, SD 1.4
    assert dict(zip(*slots.to_pydict().values(), strict=True)) == {
        "gen_0": "deepfloyd-if", "gen_1": "sd-2.1", "gen_2": "sd-xl", "gen_3": "sd-1.4"}
    assert {r["text"] for r in rows} == {"caption a1", "caption a2"}
    assert len({(r["group_key"], r["split"]) for r in rows}) == 2


def test_folder_with_sidecars_and_captions_csv(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    (root / "real").mkdir(parents=True)
    (root / "sdxl").mkdir()
    (root / "real" / "0001.jpg").write_bytes(jpeg((1, 2, 3)))
    (root / "real" / "0001.txt").write_text("a sidecar caption\n")
    (root / "sdxl" / "0001.png").write_bytes(jpeg((200, 2, 3), fmt="PNG"))
    (root / "sdxl" / "0002.png").write_bytes(jpeg((220, 2, 3), fmt="PNG"))
    (root / "captions.csv").write_text("path,caption\nsdxl/0001.png,csv caption one\n")
    store = Store(tmp_path / "store")
    assert ingest(IngestConfig(root, "folder", store)).added == 3
    rows = {Path(r["source_uri"]).relative_to(root.resolve()).as_posix(): r for r in _samples(store)}
    assert rows["real/0001.jpg"]["text"] == "a sidecar caption" and rows["real/0001.jpg"]["label"] == 0
    assert rows["sdxl/0001.png"]["text"] == "csv caption one" and rows["sdxl/0001.png"]["generator"] == "sd-xl"
    assert rows["sdxl/0001.png"]["generator_original"] == "sdxl"
    assert rows["sdxl/0002.png"]["text"] is None
    assert rows["real/0001.jpg"]["split"] == rows["sdxl/0001.png"]["split"]  # grouped by stem


def test_webdataset_with_generator_flag_and_label_map(tmp_path: Path) -> None:
    tar = _tar(
        tmp_path / "00000.tar",
        {
            "000000001.jpg": jpeg((1, 1, 1)), "000000001.txt": b"first", "000000001.json": b"{}",
            "000000002.png": jpeg((2, 2, 2), fmt="PNG"), "000000002.txt": b"second",
            "000000003.json": b"{}",  # a failed download: metadata only
        },
    )
    store = Store(tmp_path / "store")
    assert ingest(IngestConfig(tar, "webdataset", store, generator="real")).added == 2
    assert {(r["label"], r["text"]) for r in _samples(store)} == {(0, "first"), (0, "second")}

    labels = tmp_path / "labels.csv"
    labels.write_text("key,label,generator\n000000002,1,sdxl\n")
    store2 = Store(tmp_path / "store2")
    result = ingest(IngestConfig(tar, "webdataset", store2, label_map=labels))
    assert result.added == 1 and result.problems == {"unlabelled": 1}
    assert _samples(store2)[0]["generator"] == "sd-xl"
    with pytest.raises(PipelineError, match="--generator"):
        ingest(IngestConfig(tar, "webdataset", Store(tmp_path / "s3")))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_manifest_csv_and_parquet(tmp_path: Path, suffix: str) -> None:
    (tmp_path / "a.jpg").write_bytes(jpeg((5, 5, 5)))
    (tmp_path / "b.jpg").write_bytes(jpeg((250, 5, 5)))
    table = pa.table({
        "path": ["a.jpg", "b.jpg", "gone.jpg"],
        "caption": ["cap a", "cap b", "cap c"],
        "label": ["real", "1", "1"],
        "generator": ["real", "midjourney", "midjourney"],
        "split": ["test", None, None],
        "group": ["g1", "g1", "g2"],
    })
    manifest = tmp_path / f"m{suffix}"
    if suffix == ".csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, manifest)
    else:
        pq.write_table(table, manifest)
    store = Store(tmp_path / "store")
    result = ingest(IngestConfig(manifest, "manifest", store))
    assert result.added == 2 and result.problems == {"unreadable": 1}
    rows = {r["text"]: r for r in _samples(store)}
    assert rows["cap a"]["split"] == "test" and rows["cap a"]["label"] == 0
    assert rows["cap b"]["generator"] == "midjourney" and rows["cap b"]["group_key"] == "group:g1"


def test_split_is_deterministic_and_follows_fractions() -> None:
    keys = [f"k{i}" for i in range(4000)]
    splits = [assign_split(k, (0.8, 0.1, 0.1), "0") for k in keys]
    assert splits == [assign_split(k, (0.8, 0.1, 0.1), "0") for k in keys]
    share = splits.count("train") / len(keys)
    assert 0.77 < share < 0.83
    assert assign_split("k1", (0.0, 0.0, 1.0), "0") == "test"


def test_bad_split_fractions_rejected(d3: SyntheticD3, tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="summing to 1"):
        ingest(IngestConfig(d3.parquet, "d3", Store(tmp_path / "s"), split_fractions=(0.5, 0.1, 0.1)))
