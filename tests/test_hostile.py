"""Hostile inputs, driven through the CLI: each is refused or quarantined with one sentence (exit 2),
never a traceback, and nothing in the store changes behind the user's back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.store import catalog
from pipeline.store.layout import Store
from pipeline.synthetic import SyntheticD3
from tests.conftest import jpeg

runner = CliRunner()


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output
    return result.exit_code, " ".join(result.output.split())


def _count(store: Store, table: str = "samples") -> int:
    return catalog.query(store, f"SELECT count(*) FROM {table}").column(0)[0].as_py()


@pytest.mark.parametrize("query", [
    "EXPLAIN ANALYZE COPY (SELECT * FROM samples WHERE split='test') TO '{shard}' (FORMAT parquet)",
    "EXPLAIN ANALYZE INSTALL httpfs",
    "SELECT * FROM 'https://example.invalid/x.parquet'",
    "SELECT * FROM read_csv('{outside}')",
    "SELECT * FROM '{shard}'",
    "COPY samples TO '{outside}.out'",
    "EXPLAIN ANALYZE ATTACH '{store}/x.duckdb'",
])
def test_sql_cannot_write_fetch_or_read_other_files(d3_store: Store, tmp_path: Path, query: str) -> None:
    shard = catalog.shard_paths(d3_store, "samples")[0]
    before = shard.read_bytes()
    outside = tmp_path / "outside.csv"
    outside.write_text("a,b\n1,2\n")
    code, out = _run("sql", query.format(shard=shard, outside=outside, store=d3_store.root),
                     "--store", str(d3_store.root))
    assert code == 2 and out.startswith("error:"), out
    assert shard.read_bytes() == before and _count(d3_store) == 59
    assert not Path(f"{outside}.out").exists() and not (d3_store.root / "x.duckdb").exists()


def test_allow_files_reads_outside_files_but_still_writes_nothing(d3_store: Store, tmp_path: Path) -> None:
    outside = tmp_path / "outside.csv"
    outside.write_text("a,b\n1,2\n")
    code, out = _run("sql", f"SELECT sum(a) AS s FROM read_csv('{outside}')", "--store", str(d3_store.root),
                     "--allow-files", "--format", "csv")
    assert code == 0 and out.split() == ["s", "1"], out
    code, out = _run("sql", f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{tmp_path}/w.csv'", "--store",
                     str(d3_store.root), "--allow-files")
    assert code == 2 and "read-only" in out and not (tmp_path / "w.csv").exists()


@pytest.mark.parametrize("target", ["catalog.duckdb", "samples/new.parquet", "manifest.json", "."])
def test_sql_output_inside_the_store_is_refused(d3_store: Store, target: str) -> None:
    path = d3_store.root / target
    code, out = _run("sql", "SELECT 1 AS one", "--store", str(d3_store.root), "--format", "csv",
                     "--output", str(path))
    assert code == 2 and ("inside the store" in out or "is a directory" in out), out
    assert _count(d3_store) == 59 and not (d3_store.root / "samples" / "new.parquet").exists()


def test_sql_output_to_a_directory_or_missing_folder(d3_store: Store, tmp_path: Path) -> None:
    code, out = _run("sql", "SELECT 1", "--store", str(d3_store.root), "--output", str(tmp_path))
    assert code == 2 and "is a directory" in out
    code, out = _run("sql", "SELECT 1", "--store", str(d3_store.root), "--output", str(tmp_path / "no" / "x.csv"),
                     "--format", "csv")
    assert code == 2 and "does not exist" in out


def _manifest(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "m.csv"
    path.write_text("path,caption,label,generator\n" + "".join(r + "\n" for r in rows))
    return path


def test_devices_fifos_and_huge_files_are_quarantined_unread(tmp_path: Path) -> None:
    (tmp_path / "ok.jpg").write_bytes(jpeg((1, 2, 3)))
    sparse = tmp_path / "sparse.jpg"
    with open(sparse, "wb") as f:
        f.truncate(6 * 1024**3)  # 6 GB that occupy no disk: reading it would take minutes and memory
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # reading a FIFO with no writer would block forever
    manifest = _manifest(tmp_path, ["ok.jpg,a,0,real", "/dev/zero,b,1,x", f"{fifo},c,1,x", f"{sparse},d,1,x",
                                    f"{tmp_path},e,1,x"])
    store = tmp_path / "store"
    code, out = _run("ingest", str(manifest), "--format", "manifest", "--store", str(store))
    assert code == 0 and "ingested 1 new samples" in out, out
    reasons = catalog.query(Store(store), "SELECT reason, count(*) AS n FROM quarantine GROUP BY 1 ORDER BY 1")
    assert reasons.to_pylist() == [{"reason": "not_a_regular_file", "n": 3}, {"reason": "too_large", "n": 1}]


def test_max_bytes_is_a_flag(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(jpeg((1, 2, 3), size=64))
    manifest = _manifest(tmp_path, ["a.jpg,cap,1,sdxl"])
    code, out = _run("ingest", str(manifest), "--format", "manifest", "--store", str(tmp_path / "s"),
                     "--max-bytes", "100")
    assert code == 0 and "1 × too_large" in out, out


@pytest.mark.parametrize("content", [b"", b"\x00\xff\xfe binary \x00\x01" * 50, b"path;caption\nx;y\n",
                                     b'path,caption,label,generator\n"unclosed,x,1,y\n'])
def test_malformed_manifests_are_one_sentence(tmp_path: Path, content: bytes) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(content)
    code, out = _run("ingest", str(manifest), "--format", "manifest", "--store", str(tmp_path / "s"))
    assert code == 2 and out.startswith("error:") and str(manifest) in out, out
    assert not (tmp_path / "s").exists() or _count(Store(tmp_path / "s")) == 0


def test_a_jpeg_given_as_d3_is_one_sentence(tmp_path: Path) -> None:
    image = tmp_path / "photo.parquet"
    image.write_bytes(jpeg((1, 2, 3)))
    code, out = _run("ingest", str(image), "--format", "d3", "--store", str(tmp_path / "s"))
    assert code == 2 and "not a readable Parquet file" in out, out


def test_a_store_path_that_is_a_file(tmp_path: Path, d3: SyntheticD3) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    for args in (["ingest", str(d3.parquet), "--format", "d3"], ["status"], ["sql", "SELECT 1"],
                 ["verify"], ["catalog", "rebuild"]):
        code, out = _run(*args, "--store", str(path))
        assert code == 2 and "is a file" in out, (args, out)
    assert path.read_text() == "x"


def test_commands_on_a_missing_store_refuse_and_create_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    for args in (["sql", "SELECT 1"], ["verify"], ["train"]):
        code, out = _run(*args, "--store", str(missing))
        assert code == 2 and "No store" in out, (args, out)
    assert not missing.exists()


def test_same_bytes_under_two_labels_keep_the_first_label_and_list_the_claim(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    (root / "real").mkdir(parents=True)
    (root / "sdxl").mkdir()
    same = jpeg((9, 9, 9))
    (root / "real" / "a.jpg").write_bytes(same)
    (root / "sdxl" / "b.jpg").write_bytes(same)
    (root / "sdxl" / "c.jpg").write_bytes(jpeg((200, 9, 9)))
    store = tmp_path / "store"
    code, out = _run("ingest", str(root), "--format", "folder", "--store", str(store))
    assert code == 0 and "1 image came labelled generated (sd-xl), but the first copy read was kept" in out, out
    s = Store(store)
    conflicts = catalog.query(s, "SELECT detail FROM quarantine WHERE reason = 'label_conflict'").column(0)
    assert len(conflicts) == 1 and all("a.jpg" in d and "b.jpg" in d for d in conflicts.to_pylist())
    assert _count(s) == 2  # a.jpg (real, read first) and c.jpg
    assert catalog.query(s, "SELECT label FROM conflicts").column(0).to_pylist() == [0]
    # a later copy under a third name is one more claim and adds nothing
    (root / "sdxl" / "d.jpg").write_bytes(same)
    code, out = _run("ingest", str(root), "--format", "folder", "--store", str(store))
    assert code == 0 and _count(s) == 2


def test_a_later_conflict_never_hides_the_sample_already_in_the_store(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    (root / "real").mkdir(parents=True)
    same = jpeg((9, 9, 9))
    (root / "real" / "a.jpg").write_bytes(same)
    store = tmp_path / "store"
    _run("ingest", str(root), "--format", "folder", "--store", str(store))
    assert _count(Store(store)) == 1
    (root / "sdxl").mkdir()
    (root / "sdxl" / "a.jpg").write_bytes(same)
    code, out = _run("ingest", str(root), "--format", "folder", "--store", str(store))
    assert code == 0 and "the store holds it as real and keeps that label" in out
    assert _count(Store(store)) == 1


def test_missing_and_empty_captions_are_counted(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(jpeg((1, 2, 3)))
    (tmp_path / "b.jpg").write_bytes(jpeg((3, 2, 1)))
    (tmp_path / "c.jpg").write_bytes(jpeg((3, 200, 1)))
    manifest = _manifest(tmp_path, ["a.jpg,,0,real", 'b.jpg,"",1,sdxl', "c.jpg,a caption,1,sdxl"])
    code, out = _run("ingest", str(manifest), "--format", "manifest", "--store", str(tmp_path / "s"))
    assert code == 0 and "2 new samples have no caption" in out, out
    code, out = _run("status", "--store", str(tmp_path / "s"))
    assert code == 0 and "2 samples have no text" in out, out


def test_train_says_how_many_samples_each_feature_set_left_out(tmp_path: Path) -> None:
    rows = []
    for i in range(16):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg((10 * i, 200 - 10 * i, 7 * i)))
        caption = "" if i % 4 == 0 else f"caption {i}"  # 4 samples have no caption
        split = "train" if i < 8 else "val" if i < 12 else "test"
        rows.append(f"{i}.jpg,{caption},{i % 2},{'real' if i % 2 == 0 else 'sdxl'},{split}")
    path = tmp_path / "m.csv"
    path.write_text("path,caption,label,generator,split\n" + "".join(r + "\n" for r in rows))
    store = str(tmp_path / "s")
    assert _run("ingest", str(path), "--format", "manifest", "--store", store)[0] == 0
    assert _run("encode", "--store", store, "--model", "Tiny-ViT-16", "--workers", "0")[0] == 0
    code, out = _run("train", "--store", store, "--epochs", "1", "--batch-size", "4")
    assert code == 0 and "left out 4 samples without a text vector" in out, out
    code, out = _run("train", "--store", store, "--epochs", "1", "--batch-size", "4", "--features", "image")
    assert code == 0 and "left out" not in out, out


def test_bad_training_values_and_checkpoints_are_one_sentence(d3_store: Store, tmp_path: Path) -> None:
    store = str(d3_store.root)
    code, out = _run("train", "--store", store, "--lr", "-1")
    assert code == 2 and "--lr" in out, out
    toml = tmp_path / "bad.toml"
    toml.write_text('epochs = "many"\n')
    code, out = _run("train", "--store", store, "--config", str(toml))
    assert code == 2 and "epochs" in out, out
    fake = tmp_path / "weights.pt"
    fake.write_bytes(b"not a checkpoint at all")
    code, out = _run("encode", "--store", store, "--model", "Tiny-ViT-16", "--pretrained", str(fake), "--workers", "0")
    assert code == 2 and "is not a Tiny-ViT-16 checkpoint" in out, out


def test_a_damaged_shard_is_one_sentence_in_every_command(d3_store: Store) -> None:
    from pipeline.stages.encode import run as encode
    from tests.conftest import encode_config

    encode(encode_config(d3_store))
    shard = catalog.shard_paths(d3_store, "samples")[0]
    shard.write_bytes(shard.read_bytes()[:100])
    rel = d3_store.relative(shard)
    store = str(d3_store.root)
    for args in (["status"], ["sql", "SELECT count(*) FROM samples"], ["train"],
                 ["encode", "--model", "Tiny-ViT-16", "--workers", "0"]):
        code, out = _run(*args, "--store", store)
        assert code == 2 and rel in out and "pipeline verify --repair" in out, (args, out)
    code, out = _run("verify", "--store", store, "--repair")
    assert code == 0 and "moved" in out, out
    code, out = _run("status", "--store", store)
    assert code == 0, out


def test_a_broken_tar_is_quarantined_and_the_others_ingested(tmp_path: Path) -> None:
    import io
    import tarfile

    shards = tmp_path / "shards"
    shards.mkdir()
    for n in range(2):
        with tarfile.open(shards / f"{n:05d}.tar", "w") as tf:
            for i in range(3):
                data = jpeg((40 * i + n, 9, 9), size=48)
                info = tarfile.TarInfo(f"{n}{i:04d}.jpg")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    broken = shards / "00001.tar"
    broken.write_bytes(broken.read_bytes()[:2500])  # breaks off inside its second member
    (shards / "00002.tar").write_bytes(b"not a tar at all" * 100)
    code, out = _run("ingest", str(shards), "--format", "webdataset", "--generator", "real",
                     "--store", str(tmp_path / "s"))
    assert code == 0 and "unreadable_archive" in out, out
    assert 3 <= _count(Store(tmp_path / "s")) <= 4  # the whole first tar, and what precedes the break


def test_one_damaged_d3_file_of_many_is_quarantined(tmp_path: Path) -> None:
    from pipeline.synthetic import make_d3

    data = make_d3(tmp_path / "src", rows=4, size=32, missing_real=0, broken_generated=0)
    folder = tmp_path / "d3"
    folder.mkdir()
    good = folder / "0000.parquet"
    data.parquet.rename(good)
    (folder / "0001.parquet").write_bytes(good.read_bytes()[:-200])  # footer cut off
    code, out = _run("ingest", str(folder), "--format", "d3", "--real-images", str(data.real_images),
                     "--store", str(tmp_path / "s"))
    assert code == 0 and "ingested 20 new samples" in out and "unreadable_source" in out, out


def _shard(path: Path, names: list[str], mode: str = "w") -> Path:
    import io
    import tarfile

    with tarfile.open(path, mode) as tf:
        for name in names:
            data = f"bytes of {name}".encode() * 20
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _data_of(tar: Path, name: str) -> int:
    import tarfile

    with tarfile.open(tar) as tf:
        return tf.getmember(name).offset_data


def test_a_tar_cut_short_after_ingest_is_read_whole_and_its_break_quarantined(tmp_path: Path) -> None:
    tar, store = _shard(tmp_path / "s.tar", [f"{i}.jpg" for i in range(4)]), tmp_path / "s"
    code, out = _run("ingest", str(tar), "--format", "webdataset", "--generator", "real", "--store", str(store))
    assert code == 0 and _count(Store(store)) == 4, out
    tar.write_bytes(tar.read_bytes()[:_data_of(tar, "1.jpg") + 100])  # shorter than where the last read stopped
    code, out = _run("ingest", str(tar), "--format", "webdataset", "--generator", "real", "--store", str(store))
    assert code == 0 and "unreadable_archive" in out, out
    assert _count(Store(store)) == 4


def test_a_tar_grown_by_a_broken_member_quarantines_the_break_and_keeps_what_was_read(tmp_path: Path) -> None:
    tar, store = _shard(tmp_path / "s.tar", ["0.jpg", "1.jpg"]), tmp_path / "s"
    _run("ingest", str(tar), "--format", "webdataset", "--generator", "real", "--store", str(store))
    _shard(tar, ["2.jpg", "3.jpg"], "a")
    tar.write_bytes(tar.read_bytes()[:_data_of(tar, "3.jpg") + 100])  # the appended part breaks off in 3.jpg
    code, out = _run("ingest", str(tar), "--format", "webdataset", "--generator", "real", "--store", str(store))
    assert code == 0 and "unreadable_archive" in out, out
    ids = catalog.query(Store(store), "SELECT sample_id FROM samples_all").column(0).to_pylist()
    assert len(ids) == len(set(ids)) == 3


# --- every input path is bounded (issue 19: items 6, 9, 13, 14) -------------------------------

_CLI = "from pipeline.cli import main; main()"


def _cli_within(seconds: int, *args: str) -> tuple[int, str]:
    """`pipeline ARGS` in a child process that must end within `seconds`: a read that blocks (a FIFO)
    fails the test instead of hanging the suite."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "COLUMNS": "200"}
    try:
        done = subprocess.run([sys.executable, "-c", _CLI, *args], capture_output=True, text=True, env=env,
                              timeout=seconds)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"pipeline {' '.join(args)} did not end within {seconds} s") from exc
    out = done.stdout + done.stderr
    assert "Traceback" not in out, out
    return done.returncode, " ".join(out.split())


def _sparse(path: Path, size: int) -> None:
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)  # 1.5 GB that occupy no disk


def _reasons(store: Path, where: str = "true") -> dict[str, str]:
    rows = catalog.query(Store(store), f"SELECT source_uri, reason FROM quarantine WHERE {where}").to_pylist()
    return {Path(r["source_uri"]).name: r["reason"] for r in rows}


def test_encode_quarantines_fifos_devices_huge_and_swapped_files_without_blocking(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    (root / "real").mkdir(parents=True)
    for i, name in enumerate("abcde"):
        (root / "real" / f"{name}.jpg").write_bytes(jpeg((40 * i, 90, 9)))
    store = tmp_path / "store"
    code, out = _run("ingest", str(root), "--format", "folder", "--store", str(store))
    assert code == 0 and "ingested 5 new samples" in out, out
    (root / "real" / "b.jpg").unlink()
    os.mkfifo(root / "real" / "b.jpg")  # no writer: a plain open would block encode forever
    _sparse(root / "real" / "c.jpg", 3 * 1024**3 // 2)  # read whole, this held 2.4 GB
    (tmp_path / "other.jpg").write_bytes(jpeg((1, 1, 250)))
    (root / "real" / "d.jpg").unlink()
    (root / "real" / "d.jpg").symlink_to(tmp_path / "other.jpg")  # a link to other bytes
    (root / "real" / "e.jpg").unlink()
    (root / "real" / "e.jpg").symlink_to("/dev/zero")
    code, out = _cli_within(600, "encode", "--model", "Tiny-ViT-16", "--store", str(store), "--workers", "0")
    assert code == 0, out
    assert _reasons(store) == {"b.jpg": "not_a_regular_file", "c.jpg": "changed_since_ingest",
                               "d.jpg": "changed_since_ingest", "e.jpg": "not_a_regular_file"}
    details = catalog.query(Store(store), "SELECT detail FROM quarantine ORDER BY source_uri").column(0).to_pylist()
    assert "FIFO" in details[0] and "1610612736 bytes" in details[1] and "character device" in details[3], details
    assert _count(Store(store), "embeddings WHERE modality = 'image'") == 1  # a.jpg


def test_neighbors_image_is_read_bounded_and_named(d3_store: Store, tmp_path: Path) -> None:
    from pipeline.stages.encode import run as encode
    from tests.conftest import encode_config

    encode(encode_config(d3_store))
    store = ("--store", str(d3_store.root))
    text = tmp_path / "notes.jpg"
    text.write_text("these are not pixels")
    code, out = _run("neighbors", "--image", str(text), "-k", "2", *store)
    assert code == 2 and "not_an_image" in out and "BytesIO" not in out and "notes.jpg" in out.replace(" ", ""), out
    _sparse(tmp_path / "huge.jpg", 3 * 1024**3 // 2)
    code, out = _run("neighbors", "--image", str(tmp_path / "huge.jpg"), *store)
    assert code == 2 and "too_large" in out and "1610612736 bytes" in out, out
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    code, out = _cli_within(300, "neighbors", "--image", str(fifo), *store)
    assert code == 2 and "FIFO, not a regular file" in out, out


def _clip_folder(root: Path, rows: list[dict[str, object]], image: list[list[float]], text: list[list[float]]) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    np.save(root / "img_emb" / "img_emb_0.npy", np.array(image, np.float32))
    np.save(root / "text_emb" / "text_emb_0.npy", np.array(text, np.float32))
    pq.write_table(pa.Table.from_pylist(rows), root / "metadata" / "metadata_0.parquet")
    return root


def test_import_features_reads_no_file_outside_its_folder_and_stores_no_unsound_vector(tmp_path: Path) -> None:
    import hashlib

    import numpy as np

    root = tmp_path / "feats"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.jpg").write_bytes(jpeg((9, 90, 9)))
    (tmp_path / "outside").mkdir()
    secret = tmp_path / "outside" / "secret.jpg"
    secret.write_bytes(b"a file of this machine that no features file may bring into the store")
    (root / "images" / "escape.jpg").symlink_to(secret)
    os.mkfifo(root / "images" / "pipe.jpg")
    paths = ["images/a.jpg", "/etc/passwd", "../outside/secret.jpg", "images/escape.jpg", "images/pipe.jpg",
             "gone.jpg", None, None, None, None, None]
    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(11, 8)).tolist(), rng.normal(size=(11, 8)).tolist()
    image[6][3] = float("nan")  # row 6: a NaN in its image vector
    text[7][0] = float("inf")  # row 7: an infinity in its text vector
    image[8] = [0.0] * 8  # row 8: no direction
    image[10] = image[9]  # rows 9 and 10: the same vector, labelled real and generated
    rows = [{"image_path": p, "caption": f"caption {i}", "label": i % 2} for i, p in enumerate(paths)]
    _clip_folder(root, rows, image, text)
    store = tmp_path / "store"
    code, out = _cli_within(300, "import-features", str(root), "--layout", "clip-retrieval", "--model-key", "m",
                            "--store", str(store))
    assert code == 0, out
    s = Store(store)
    ids = set(catalog.query(s, "SELECT sample_id FROM samples_all").column(0).to_pylist())
    forbidden = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (secret, Path("/etc/passwd")) if p.exists()}
    assert hashlib.sha256(jpeg((9, 90, 9))).hexdigest() in ids and not ids & forbidden
    assert _count(s, "samples_all WHERE source_uri LIKE '%secret%' OR source_uri LIKE '/etc/%'") == 0
    assert len(ids) == 7  # 11 rows less the NaN and zero image vectors and the conflicting pair
    reasons = catalog.query(s, "SELECT reason, count(*) AS n FROM quarantine GROUP BY 1 ORDER BY 1").to_pylist()
    assert reasons == [{"reason": "label_conflict", "n": 2}, {"reason": "nonfinite_vector", "n": 2},
                       {"reason": "zero_vector", "n": 1}], reasons
    assert _count(s, "quarantine WHERE stage = 'import' AND source_row IN (6, 7, 8, 9, 10)") == 5
    unsound = "embeddings WHERE NOT isfinite(list_dot_product(vector, vector)) OR list_dot_product(vector, vector) < .9"
    # vectors only for the samples kept: 7 images; the texts of rows 0-5 (row 7's is unsound)
    assert _count(s, unsound) == 0 and _count(s, "embeddings") == 7 + 6
    # a second run (the file touched) records nothing twice
    os.utime(root / "metadata" / "metadata_0.parquet")
    code, out = _cli_within(300, "import-features", str(root), "--layout", "clip-retrieval", "--model-key", "m",
                            "--store", str(store))
    assert code == 0 and _count(s, "quarantine") == 5 and _count(s, "samples") == 7, out


def test_import_features_image_roots_admit_a_folder_the_user_names(tmp_path: Path) -> None:
    import hashlib

    import numpy as np

    from pipeline.stages.import_features import ImportConfig
    from pipeline.stages.import_features import run as import_features

    (tmp_path / "pictures").mkdir()
    picture = tmp_path / "pictures" / "p.jpg"
    picture.write_bytes(jpeg((200, 1, 1)))
    root = _clip_folder(tmp_path / "feats", [{"image_path": str(picture), "caption": "c", "label": 1}],
                        np.ones((1, 8)).tolist(), np.ones((1, 8)).tolist())
    alone = import_features(ImportConfig(root, "clip-retrieval", Store(tmp_path / "s1"), "m"))
    assert alone.image_paths_unread == {"outside_source": 1}
    named = import_features(ImportConfig(root, "clip-retrieval", Store(tmp_path / "s2"), "m",
                                         image_roots=(tmp_path / "pictures",)))
    assert not named.image_paths_unread
    row = catalog.query(Store(tmp_path / "s2"), "SELECT sample_id, byte_length FROM samples").to_pylist()[0]
    assert row == {"sample_id": hashlib.sha256(picture.read_bytes()).hexdigest(), "byte_length": picture.stat().st_size}


@pytest.mark.parametrize("bad", ["1-D", "strings", "objects", "3-D", "not npy"])
def test_import_features_bad_arrays_are_one_sentence_naming_the_file(tmp_path: Path, bad: str) -> None:
    import numpy as np

    root = _clip_folder(tmp_path / "feats", [{"caption": "c", "label": 0}], [[1.0, 2.0]], [[1.0, 2.0]])
    target = root / "img_emb" / "img_emb_0.npy"
    if bad == "not npy":
        target.write_bytes(b"\x93NUMPY garbage")
    else:
        array = {"1-D": np.ones(2, np.float32), "strings": np.array([["a", "b"]]),
                 "objects": np.array([[{"x": 1}, None]], dtype=object), "3-D": np.ones((1, 2, 2), np.float32)}[bad]
        np.save(target, array, allow_pickle=True)
    code, out = _run("import-features", str(root), "--layout", "clip-retrieval", "--model-key", "m",
                     "--store", str(tmp_path / "s"))
    assert code == 2 and out.startswith("error:") and "img_emb_0.npy" in out.replace(" ", ""), out


def test_import_features_bad_h5_datasets_are_one_sentence(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    import numpy as np

    (tmp_path / "h5").mkdir()
    with h5py.File(tmp_path / "h5" / "0000.h5", "w") as h:
        for name in ["real", "image_gen0", "image_gen1", "image_gen2", "image_gen3", "original_prompt"]:
            h[name] = np.ones((3, 8), np.float32)
        h["positive_prompt"] = np.array([b"a", b"b", b"c"])
    code, out = _run("import-features", str(tmp_path / "h5"), "--layout", "h5", "--model-key", "m",
                     "--store", str(tmp_path / "s"))
    assert code == 2 and "0000.h5datasetpositive_prompt" in out.replace(" ", "") and "2-D float" in out, out
    with h5py.File(tmp_path / "h5" / "0000.h5", "a") as h:
        del h["positive_prompt"]
        h["positive_prompt"] = np.ones((2, 8), np.float32)
    code, out = _run("import-features", str(tmp_path / "h5"), "--layout", "h5", "--model-key", "m",
                     "--store", str(tmp_path / "s"))
    assert code == 2 and "different numbers of rows" in out, out


def test_ingest_keeps_names_that_are_not_utf8_and_never_blocks_on_fifos(tmp_path: Path) -> None:
    from pipeline.stages.encode import run as encode
    from tests.conftest import encode_config

    root = os.fsencode(tmp_path / "imgs")
    for cls in (b"real", b"sd\xe9"):
        os.makedirs(root + b"/" + cls)
    with open(root + b"/real/caf\xe9.jpg", "wb") as f:
        f.write(jpeg((10, 20, 30)))
    with open(root + b"/real/caf\xe9.txt", "wb") as f:
        f.write(b"a caption")
    with open(root + b"/sd\xe9/caf\xe9.jpg", "wb") as f:
        f.write(jpeg((200, 20, 30)))
    with open(root + b"/real/ok.jpg", "wb") as f:
        f.write(jpeg((90, 90, 30)))
    os.mkfifo(root + b"/real/ok.txt")  # a sidecar caption that is a FIFO: no caption, no hang
    os.mkfifo(root + b"/real/pipe.jpg")
    store = tmp_path / "store"
    code, out = _cli_within(300, "ingest", os.fsdecode(root), "--format", "folder", "--store", str(store))
    assert code == 0 and "ingested 3 new samples" in out and "1 × not_a_regular_file" in out, out
    rows = {r["source_uri"].rpartition("/imgs/")[2]: r for r in catalog.query(
        Store(store), "SELECT source_uri, group_key, generator_original, text FROM samples").to_pylist()}
    assert sorted(rows) == ["real/caf%E9.jpg", "real/ok.jpg", "sd%E9/caf%E9.jpg"]  # kept byte for byte, as URIs
    assert rows["real/caf%E9.jpg"]["source_uri"].startswith("file:///")
    # one group: the same stem in both classes; names that need no URI shown with \x escapes
    assert rows["real/caf%E9.jpg"]["group_key"] == rows["sd%E9/caf%E9.jpg"]["group_key"] == "stem:caf\\xe9"
    assert rows["sd%E9/caf%E9.jpg"]["generator_original"] == "sd\\xe9"
    assert [rows[k]["text"] for k in sorted(rows)] == ["a caption", None, None]
    result = encode(encode_config(Store(store)))  # the URI leads back to the file
    assert result.images_encoded == 3 and not result.quarantined


def test_a_manifest_line_over_the_cap_is_quarantined_and_the_rest_read(tmp_path: Path) -> None:
    from pipeline.sources.manifest import MAX_LINE_BYTES

    for i in range(6):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg((30 * i, 9, 9)))
    long, over = "y" * (3 * MAX_LINE_BYTES // 4), "z" * (MAX_LINE_BYTES + 10)  # 1.5 MB: read; 2 MB+: not
    manifest = _manifest(tmp_path, ["0.jpg,a,0,real", "1.jpg,b,1,sdxl", f"2.jpg,{long},1,sdxl",
                                    f"3.jpg,{over},0,real", "4.jpg,e,0,real", "5.jpg,f,1,sdxl"])
    store = tmp_path / "s"
    code, out = _run("ingest", str(manifest), "--format", "manifest", "--store", str(store))
    assert code == 0 and "ingested 5 new samples" in out and "1 × line_too_long" in out, out
    row = catalog.query(Store(store), "SELECT source_row, detail FROM quarantine").to_pylist()[0]
    assert row["source_row"] == 5 and "m.csv line 5" in row["detail"]
    assert _count(Store(store), f"samples WHERE length(text) = {len(long)}") == 1
