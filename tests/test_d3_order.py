"""D3's generator order: the forms agree image by image, and a disagreement is said in a sentence.

Facts of the published record 1275001022128 (Hugging Face Parquet row, and the same record in
CoDE's webdataset shard `elsa_v2-0000.tar`): its `model_gen0..3` are DeepFloyd IF, SD 2.1, SD XL
and SD 1.4; the shard's `gen_{k}.jpg` is the row's `image_gen{k}` re-encoded (same pixels, other
bytes). The test data below are synthetic images built to those facts.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import PipelineError
from pipeline.sources import d3_order
from pipeline.sources.d3 import DEFAULT_GENERATORS
from pipeline.sources.generators import canonical
from pipeline.stages.import_features import ImportConfig
from pipeline.stages.import_features import run as import_features
from pipeline.stages.ingest import IngestConfig
from pipeline.stages.ingest import run as ingest
from pipeline.store import catalog
from pipeline.store.layout import Store

RECORD = "1275001022128"
MODEL_GEN = ("DeepFloyd/IF-I-M-v1.0", "stabilityai/stable-diffusion-2-1-base",
             "stabilityai/stable-diffusion-xl-base-1.0", "CompVis/stable-diffusion-v1-4")  # model_gen0..3
D3 = "deepfloyd-if,sd-2.1,sd-xl,sd-1.4"
OLD = "deepfloyd-if,sd-1.4,sd-2.1,sd-xl"  # this tool's default before: three of four names wrong
runner = CliRunner()


def _cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())  # rich wraps at the terminal's width


def _pixels(row_id: str, k: int, size: int = 64) -> np.ndarray:
    """A smooth picture of its own per row and column, so that pixels tell them apart."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng([int(row_id), k])
    waves = [np.sin(rng.uniform(2, 9) * xx + rng.uniform(0, 6)) * np.cos(rng.uniform(2, 9) * yy) for _ in range(3)]
    return np.clip(127 + 120 * np.stack(waves, -1), 0, 255).astype(np.uint8)


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _row(row_id: str = RECORD, models: tuple[str, ...] = MODEL_GEN, struct: bool = True) -> dict[str, Any]:
    row: dict[str, Any] = {"id": row_id, "original_prompt": "architecture bathroom toilet kitchen cabinetry",
                           "positive_prompt": "a bathroom with kitchen cabinetry, highly detailed",
                           "url": f"https://example.invalid/{row_id}.jpg"}
    for k in range(4):
        data = _encode(_pixels(row_id, k), "PNG")
        row[f"image_gen{k}"] = {"bytes": data, "path": f"{row_id}_gen{k}.png"} if struct else data
        row[f"model_gen{k}"] = models[k]
    return row


def _parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _code_shard(path: Path, row_id: str = RECORD) -> Path:
    """The record as CoDE's wds_creation.py writes it: gen_k.jpg re-encoded from image_gen{k}."""
    members = {f"gen_{k}.jpg": _encode(_pixels(row_id, k), "JPEG") for k in range(4)}
    members |= {"real.jpg": _encode(_pixels(row_id, 9), "JPEG"), "caption.txt": b"architecture bathroom toilet",
                "url.txt": f"https://example.invalid/{row_id}.jpg".encode()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(f"elsa_v2__train__{row_id}.{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _h5(path: Path, rows: int = 3, dim: int = 8) -> Path:
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for name in ("real", "image_gen0", "image_gen1", "image_gen2", "image_gen3", "original_prompt",
                     "positive_prompt"):
            f[name] = rng.normal(size=(rows, dim)).astype(np.float32)
    return path


def _generated(store: Store) -> list[dict[str, Any]]:
    sql = "SELECT generator, source_uri, source_member, byte_offset, byte_length FROM samples WHERE label = 1"
    return catalog.query(store, sql).to_pylist()


def _decoded(sample: dict[str, Any], parquet: Path | None) -> np.ndarray:
    """The sample's pixels, from the Parquet cell or the tar member where its bytes live."""
    if parquet is not None:
        cell = pq.read_table(parquet, columns=[sample["source_member"]]).column(0)[0].as_py()
        data = cell["bytes"] if isinstance(cell, dict) else cell
    else:
        with open(sample["source_uri"], "rb") as f:
            f.seek(sample["byte_offset"])
            data = f.read(sample["byte_length"])
    small = Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64))
    return np.asarray(small, dtype=np.float64)


def test_the_published_record_gets_one_name_per_image_from_both_forms(tmp_path: Path) -> None:
    """The Parquet row and the CoDE shard, each ingested with the default order: each image, matched
    by its pixels (the bytes differ), gets the same generator name from both."""
    parquet = _parquet(tmp_path / "d3" / "train-00000.parquet", [_row()])
    shard = _code_shard(tmp_path / "code" / "elsa_v2-0000.tar")
    from_parquet, from_shard = Store(tmp_path / "p"), Store(tmp_path / "w")
    assert ingest(IngestConfig(parquet, "d3", from_parquet)).generator_warnings == []
    assert ingest(IngestConfig(shard, "d3", from_shard)).generator_warnings == []
    by_parquet, by_shard = _generated(from_parquet), _generated(from_shard)
    assert {r["source_member"]: r["generator"] for r in by_parquet} == {
        "image_gen0": "deepfloyd-if", "image_gen1": "sd-2.1", "image_gen2": "sd-xl", "image_gen3": "sd-1.4"}
    pixels = [_decoded(r, None) for r in by_shard]
    for sample in by_parquet:
        errors = [float(np.mean((_decoded(sample, parquet) - p) ** 2)) for p in pixels]
        twin = by_shard[int(np.argmin(errors))]
        assert sorted(errors)[0] < 20 < sorted(errors)[1]  # one twin, re-encoded; the others far
        assert twin["generator"] == sample["generator"], (sample, twin)
    ids = "SELECT sample_id FROM samples WHERE label = 1 ORDER BY 1"
    assert not set(catalog.query(from_parquet, ids).column(0).to_pylist()) & set(
        catalog.query(from_shard, ids).column(0).to_pylist())  # why the same-bytes guard never fires


def test_both_forms_from_the_command_line(tmp_path: Path) -> None:
    parquet = _parquet(tmp_path / "d3" / "train-00000.parquet", [_row()])
    shard = _code_shard(tmp_path / "code" / "elsa_v2-0000.tar")
    store = str(tmp_path / "store")
    code, out = _cli("ingest", str(parquet), "--format", "d3", "--generators", D3, "--store", store)
    assert code == 0 and "ingested 4 new samples" in out and "--generators" not in out, out
    code, out = _cli("ingest", str(shard), "--format", "d3", "--generators", D3, "--store", store)
    assert code == 0 and "ingested 5 new samples" in out and "--generators" not in out, out
    names = catalog.query(Store(tmp_path / "store"), "SELECT count(DISTINCT generator) FROM samples WHERE label = 1")
    assert names.column(0)[0].as_py() == 4


def test_the_command_line_default_is_d3s_order(tmp_path: Path) -> None:
    parquet = _parquet(tmp_path / "d3.parquet", [_row()])
    for source in (parquet, _code_shard(tmp_path / "w.tar")):
        code, out = _cli("ingest", str(source), "--format", "d3", "--store", str(tmp_path / "s"))
        assert code == 0 and "--generators" not in out, out
    code, out = _cli("import-features", str(_h5(tmp_path / "h5" / "0000.h5")), "--layout", "h5",
                     "--model-key", "ViT-L-14__openai", "--store", str(tmp_path / "t"))
    assert code == 0 and "--generators" not in out, out


def test_h5_features_take_d3s_order_by_default(tmp_path: Path) -> None:
    """The reference code writes the Parquet's image_gen{k} as h5 dataset image_gen{k}."""
    store = Store(tmp_path / "store")
    result = import_features(ImportConfig(_h5(tmp_path / "h5" / "0000.h5"), "h5", store, "ViT-L-14__openai"))
    assert result.generator_warnings == []
    names = catalog.query(store, "SELECT DISTINCT source_member, generator FROM samples WHERE label = 1").to_pylist()
    assert {r["source_member"]: r["generator"] for r in names} == dict(
        zip(["image_gen0", "image_gen1", "image_gen2", "image_gen3"], D3.split(","), strict=True))
    assert DEFAULT_GENERATORS == tuple(D3.split(","))


def test_a_parquet_in_another_order_keeps_its_names_and_says_what_the_other_forms_need(tmp_path: Path) -> None:
    models = (MODEL_GEN[3], MODEL_GEN[1], MODEL_GEN[2], MODEL_GEN[0])
    parquet = _parquet(tmp_path / "d3.parquet", [_row(str(i), models) for i in range(3)])
    store = Store(tmp_path / "store")
    result = ingest(IngestConfig(parquet, "d3", store))
    assert {r["source_member"]: r["generator"] for r in _generated(store)}["image_gen0"] == "sd-1.4"  # the truth
    [warning] = result.generator_warnings
    assert "3 D3 Parquet rows (the first in d3.parquet)" in warning
    assert "pass --generators sd-1.4,sd-2.1,sd-xl,deepfloyd-if with the webdataset form" in warning
    again = ingest(IngestConfig(parquet, "d3", store))  # nothing read: nothing to say
    assert again.units_skipped == 1 and again.generator_warnings == []
    same = ingest(IngestConfig(_parquet(tmp_path / "ok.parquet", [_row()]), "d3", store))
    assert same.generator_warnings == []


class _Events:
    def __init__(self) -> None:
        self.log: list[tuple[str, object]] = []

    def start(self, task: str, total: int | None, unit: str) -> None:
        self.log.append(("start", task))

    def advance(self, task: str, n: int) -> None:
        self.log.append(("advance", n))

    def note(self, message: str) -> None:
        self.log.append(("note", message))

    def event(self, kind: str, data: dict[str, Any]) -> None:
        pass


def test_the_webdataset_form_in_the_wrong_order_beside_parquet_rows_is_told_before_it_is_read(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    ingest(IngestConfig(_parquet(tmp_path / "d3.parquet", [_row()]), "d3", store))
    events = _Events()
    result = ingest(IngestConfig(_code_shard(tmp_path / "w.tar"), "d3", store, generators=tuple(OLD.split(","))),
                    events)
    [warning] = result.generator_warnings
    assert warning.startswith("This store's D3 Parquet samples name image_gen0..3 deepfloyd-if, sd-2.1, sd-xl, "
                              "sd-1.4 (their model_gen0..3), but gen_0..gen_3 of this webdataset are named "
                              "deepfloyd-if, sd-1.4, sd-2.1, sd-xl (--generators)")
    assert "pass --generators deepfloyd-if,sd-2.1,sd-xl,sd-1.4" in warning
    notes = [i for i, (kind, _) in enumerate(events.log) if kind == "note"]
    assert notes and notes[0] < min(i for i, (kind, _) in enumerate(events.log) if kind == "advance")
    assert len(notes) == 1  # noted once, though checked again at the end
    right = ingest(IngestConfig(_code_shard(tmp_path / "w2.tar", "7"), "d3", store))
    assert right.generator_warnings == []


def test_the_old_default_order_is_caught_with_no_parquet_rows_to_compare(tmp_path: Path) -> None:
    shard = _code_shard(tmp_path / "w.tar")
    code, out = _cli("ingest", str(shard), "--format", "d3", "--generators", OLD, "--store", str(tmp_path / "s"))
    assert code == 0 and "a reordering of D3's deepfloyd-if, sd-2.1, sd-xl, sd-1.4" in out, out
    assert "pass --generators deepfloyd-if,sd-2.1,sd-xl,sd-1.4" in out
    other = ingest(IngestConfig(shard, "d3", Store(tmp_path / "t"), generators=("a", "b", "c", "d")))
    assert other.generator_warnings == []  # not D3's four generators: nothing to compare with


def test_h5_features_beside_parquet_rows_in_another_order_are_told(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    ingest(IngestConfig(_parquet(tmp_path / "d3.parquet", [_row()]), "d3", store))
    h5 = _h5(tmp_path / "h5" / "0000.h5")
    code, out = _cli("import-features", str(h5), "--layout", "h5", "--model-key", "ViT-L-14__openai",
                     "--generators", OLD, "--store", str(store.root))
    assert code == 0 and "but image_gen0..3 of this h5 source are named deepfloyd-if, sd-1.4, sd-2.1, sd-xl" in out
    assert "pass --generators deepfloyd-if,sd-2.1,sd-xl,sd-1.4" in out, out
    fine = import_features(ImportConfig(h5.parent, "h5", Store(tmp_path / "s2"), "ViT-L-14__openai"))
    assert fine.generator_warnings == []


def test_parquet_rows_after_a_webdataset_named_in_another_order_say_which_form_to_redo(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    ingest(IngestConfig(_code_shard(tmp_path / "w.tar"), "d3", store, generators=tuple(OLD.split(","))))
    result = ingest(IngestConfig(_parquet(tmp_path / "d3.parquet", [_row()]), "d3", store))
    [warning] = result.generator_warnings
    assert warning.startswith("This store's D3 webdataset samples name gen_0..gen_3 deepfloyd-if, sd-1.4, sd-2.1, "
                              "sd-xl, but 1 D3 Parquet rows (the first in d3.parquet) say image_gen0..3 are ")
    assert warning.endswith("ingest the webdataset form again into a new store with --generators "
                            "deepfloyd-if,sd-2.1,sd-xl,sd-1.4.")


def test_the_store_is_read_only_when_a_run_reads_something(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Store] = []
    real = d3_order.stored_orders
    monkeypatch.setattr(d3_order, "stored_orders", lambda store: calls.append(store) or real(store))
    store = Store(tmp_path / "store")
    shard = _code_shard(tmp_path / "w.tar")
    ingest(IngestConfig(shard, "d3", store))
    assert len(calls) == 1  # once per run, before the shard is read
    ingest(IngestConfig(shard, "d3", store))  # unchanged: skipped unread, and the order not looked up
    ingest(IngestConfig(_parquet(tmp_path / "d3.parquet", [_row()]), "d3", store))
    assert len(calls) == 2


def test_stored_orders_by_form(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    assert d3_order.stored_orders(store) == {}
    ingest(IngestConfig(_parquet(tmp_path / "d3.parquet", [_row()]), "d3", store))
    ingest(IngestConfig(_code_shard(tmp_path / "w.tar"), "d3", store, generators=tuple(OLD.split(","))))
    assert d3_order.stored_orders(store) == {"parquet": tuple(D3.split(",")), "webdataset": tuple(OLD.split(","))}


# --- item 13 of issue 19: other layouts of a D3 Parquet file --------------------------------


def test_plain_binary_images_are_read_as_the_image_struct_is(tmp_path: Path) -> None:
    struct = _parquet(tmp_path / "a" / "d3.parquet", [_row(), _row("2")])
    plain = _parquet(tmp_path / "b" / "d3.parquet", [_row(struct=False), _row("2", struct=False)])
    assert pa.types.is_binary(pq.read_schema(plain).field("image_gen0").type)
    ids = "SELECT sample_id, generator, group_key, text FROM samples ORDER BY 1"
    stores = [Store(tmp_path / "s1"), Store(tmp_path / "s2")]
    for source, store in zip((struct, plain), stores, strict=True):
        assert ingest(IngestConfig(source, "d3", store)).added == 8
    assert catalog.query(stores[0], ids).to_pylist() == catalog.query(stores[1], ids).to_pylist()


def test_a_row_with_no_image_is_quarantined_not_hashed_as_empty(tmp_path: Path) -> None:
    row = _row()
    row["image_gen2"] = None
    result = ingest(IngestConfig(_parquet(tmp_path / "d3.parquet", [row]), "d3", Store(tmp_path / "s")))
    assert result.added == 3 and result.problems["image_missing"] == 1


@pytest.mark.parametrize(("column", "value", "holds"), [
    ("positive_prompt", ["a prompt", "another"], "list<element: string>"),
    ("original_prompt", ["a caption"], "list<element: string>"),
    ("image_gen1", "not bytes", "string"),
    ("model_gen3", 14, "int64"),
])
def test_a_column_of_another_type_is_refused_in_one_sentence(tmp_path: Path, column: str, value: object,
                                                             holds: str) -> None:
    row = _row()
    row[column] = value
    parquet = _parquet(tmp_path / "d3.parquet", [row])
    with pytest.raises(PipelineError, match=f"its column {column} holds {holds}, not "):
        ingest(IngestConfig(parquet, "d3", Store(tmp_path / "s")))
    code, out = _cli("ingest", str(parquet), "--format", "d3", "--store", str(tmp_path / "s"))
    assert code == 2 and f"error: {parquet} is not in the D3 layout: its column {column} holds" in out, out
    assert "Traceback" not in out


def test_one_bad_file_of_many_is_quarantined_and_the_others_read(tmp_path: Path) -> None:
    row = _row()
    row["positive_prompt"] = ["a", "b"]
    _parquet(tmp_path / "d3" / "0000.parquet", [row])
    _parquet(tmp_path / "d3" / "0001.parquet", [_row("2")])
    result = ingest(IngestConfig(tmp_path / "d3", "d3", Store(tmp_path / "s")))
    assert result.added == 4 and result.problems == {"unreadable_source": 1, "real_image_missing": 1}


@pytest.mark.parametrize(("given", "name"), [
    ("DeepFloyd/IF-I-M-v1.0", "deepfloyd-if"), ("IF-I-M-v1.0", "deepfloyd-if"), ("DeepFloyd IF", "deepfloyd-if"),
    ("stabilityai/stable-diffusion-2-1", "sd-2.1"), ("Stable Diffusion 2.1", "sd-2.1"),
    ("stabilityai/stable-diffusion-xl-base-1.0", "sd-xl"), ("Stable Diffusion XL 1.0", "sd-xl"),
    ("CompVis/stable-diffusion-v1-4", "sd-1.4"), ("Stable Diffusion 1.4", "sd-1.4"),
    ("stable_diffusion_v_1_4", "sd-1.4"), ("stable-diffusion-1-4", "sd-1.4"), ("stable_diffusion_v_1_5", "sd-1.5"),
    (" SDXL ", "sd-xl"), ("midjourney-v5", "midjourney-v5"),
])
def test_format_specific_names_are_canonical(given: str, name: str) -> None:
    assert canonical(given) == name
