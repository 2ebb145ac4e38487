"""The cache: a second encode does no forward pass; kills lose nothing; hostile inputs are quarantined."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.encoding.clip import ModelSpec, load, picture_transform, split_transform
from pipeline.encoding.units import Decoded, DecodeImages, EncodeImages, EncodeSpec, EncodeTexts
from pipeline.errors import PipelineError
from pipeline.stages.encode import pending_images_sql, write_pending
from pipeline.stages.encode import run as encode
from pipeline.stages.ingest import IngestConfig
from pipeline.stages.ingest import run as ingest
from pipeline.store import catalog, writes
from pipeline.store.layout import Store
from pipeline.synthetic import SyntheticD3, make_d3
from tests.conftest import TINY, encode_config, jpeg, kill_when, locked


def _count(store: Store, sql: str) -> int:
    return catalog.query(store, sql).column(0)[0].as_py()


def test_second_encode_does_no_forward_pass(d3_store: Store) -> None:
    first = encode(encode_config(d3_store))
    samples = _count(d3_store, "SELECT count(*) FROM samples")
    texts = _count(d3_store, "SELECT count(DISTINCT text_hash) FROM samples")
    assert first.images_encoded == samples - 1  # one truncated image is quarantined
    assert first.quarantined == {"truncated": 1}
    assert first.texts_encoded == texts == 12 + 11  # each prompt once for its four images
    assert first.image_forward_passes > 0 and first.random_weights

    second = encode(encode_config(d3_store))
    assert second.nothing_to_do
    assert second.image_forward_passes == second.text_forward_passes == 0
    assert _count(d3_store, "SELECT count(*) FROM embeddings") == samples - 1 + texts


def test_new_samples_cost_only_their_own_encoding(d3_store: Store, tmp_path: Path) -> None:
    encode(encode_config(d3_store))
    root = tmp_path / "more"
    (root / "real").mkdir(parents=True)
    (root / "real" / "x.jpg").write_bytes(jpeg((1, 99, 1)))
    (root / "real" / "x.txt").write_text("a brand new caption")
    ingest(IngestConfig(root, "folder", d3_store))
    again = encode(encode_config(d3_store))
    assert (again.images_encoded, again.texts_encoded) == (1, 1)
    assert again.image_forward_passes == again.text_forward_passes == 1


def test_vectors_are_unit_norm_float16_fixed_size_lists(d3_store: Store) -> None:
    result = encode(encode_config(d3_store))
    shard = next(p for p in result.shards if p.name.startswith("image-"))
    table = pq.read_table(shard)
    assert table.schema.field("vector").type == pa.list_(pa.float16(), 64)
    vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)


def test_float32_storage_and_dtype_conflict(d3_store: Store) -> None:
    encode(encode_config(d3_store, dtype="float32"))
    with pytest.raises(PipelineError, match="holds float32 vectors"):
        encode(encode_config(d3_store, dtype="float16"))


def _pending_rows(store: Store, model_key: str, tmp: Path) -> pa.Table:
    path = tmp / "pending.parquet"
    with catalog.connect(store) as con:
        write_pending(con, pending_images_sql(False), model_key, path)
    return pq.read_table(path)


def test_units_are_arrow_in_arrow_out_and_pure(d3_store: Store, tmp_path: Path) -> None:
    loaded = load(ModelSpec(TINY), torch.device("cpu"))
    spec = EncodeSpec.from_info(ModelSpec(TINY), loaded.info, "float16", 64_000_000)
    rows = _pending_rows(d3_store, loaded.model_key, tmp_path).slice(0, 8)
    images = EncodeImages(replace(spec, device="cpu"), loaded)
    out1, out2 = images(rows), images(rows)
    assert out1.schema == spec.schema and out1.equals(out2) and out1.num_rows == 8
    # decoding in another worker, then encoding, gives the very same rows
    assert images(DecodeImages(spec)(rows)).equals(out1)
    # the batched ToTensor + Normalize equals open_clip's own transform, picture by picture
    decoded = DecodeImages(spec)(rows)
    ok = decoded.filter(pa.compute.is_valid(decoded.column("pixels")))
    pictures = np.array(ok.column("pixels").combine_chunks().flatten().to_numpy()).reshape(-1, *spec.picture_shape)
    assert images.scale is not None
    expected = torch.stack([images.to_tensor(p) for p in pictures])
    assert torch.equal(images._tensors(pictures), expected)
    texts = EncodeTexts(replace(spec, device="cpu"), loaded)(pa.table({"text_hash": ["h1"], "text": ["a red cat"]}))
    assert texts.schema == spec.schema and texts.column("modality").to_pylist() == ["text"]
    # the stage stores what the unit returns
    encode(encode_config(d3_store))
    stored = catalog.query(
        d3_store, "SELECT content_hash, vector, norm FROM embeddings WHERE modality = 'image'"
    ).to_pylist()
    by_hash = {r["content_hash"]: r for r in stored}
    for row in out1.filter(pa.compute.is_valid(out1.column("vector"))).to_pylist():
        assert np.allclose(by_hash[row["content_hash"]]["vector"], np.asarray(row["vector"], np.float32), atol=1e-3)
        assert by_hash[row["content_hash"]]["norm"] == pytest.approx(row["norm"], rel=1e-5)


@pytest.mark.parametrize("preprocess", [
    {"size": 64},
    {"size": [224, 224], "interpolation": "bilinear"},
    {"size": 33, "resize_mode": "squash", "interpolation": "random"},
    {"size": [40, 56], "resize_mode": "squash"},
    {"size": [48, 48], "resize_mode": "shortest", "mean": [0.5, 0.5, 0.5], "fill_color": 0},
])
def test_decoding_resizes_and_crops_exactly_as_open_clip(preprocess: dict) -> None:
    from PIL import Image

    ours, theirs = picture_transform(preprocess), split_transform(preprocess)[0]
    assert "open_clip" not in type(ours).__module__
    rng = np.random.default_rng(0)
    for w, h in [(64, 64), (300, 97), (97, 300), (7, 5), (225, 224), (1, 400), (511, 512)]:
        for mode in ("RGB", "L"):
            img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
            assert np.array_equal(np.asarray(ours(img)), np.asarray(theirs(img))), (preprocess, w, h, mode)


def test_decoding_imports_no_open_clip(d3_store: Store, tmp_path: Path) -> None:
    """A decoding worker needs PIL, not open_clip (which imports transformers and timm: seconds)."""
    loaded = load(ModelSpec(TINY), torch.device("cpu"))
    spec = EncodeSpec.from_info(ModelSpec(TINY), loaded.info, "float16", 64_000_000)
    _pending_rows(d3_store, loaded.model_key, tmp_path)
    script = textwrap.dedent("""
        import pickle, sys
        import pyarrow.parquet as pq
        from pipeline.encoding.units import DecodeImages
        decoded = DecodeImages(pickle.loads(bytes.fromhex(sys.argv[1]))).decode(pq.read_table(sys.argv[2]))
        print(int(decoded.ok.sum()), "open_clip" in sys.modules)
    """)
    import pickle

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script, pickle.dumps(spec).hex(), str(tmp_path / "pending.parquet")],
                          env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == [str(_count(d3_store, "SELECT count(*) FROM samples") - 1), "False"]


def test_started_batches_finish_in_any_order_with_the_same_rows(d3_store: Store, tmp_path: Path) -> None:
    loaded = load(ModelSpec(TINY), torch.device("cpu"))
    spec = EncodeSpec.from_info(ModelSpec(TINY), loaded.info, "float32", 64_000_000)
    rows = _pending_rows(d3_store, loaded.model_key, tmp_path)
    images = EncodeImages(replace(spec, device="cpu"), loaded)
    decoded = DecodeImages(spec).decode(rows)
    assert not decoded.ok.all() and decoded.ok.any()  # the truncated image
    # the Arrow form round-trips, zero-copy
    again = Decoded.from_table(decoded.as_table(), spec.picture_shape)
    assert again.rows.equals(decoded.rows) and np.array_equal(again.ok, decoded.ok)
    assert np.array_equal(again.pictures, decoded.pictures)
    first, second = images.start(decoded), images.start(rows.slice(0, 3))
    assert images.finish(second).equals(images(rows.slice(0, 3)))
    assert images.finish(first).equals(images(rows))
    failed = Decoded(decoded.rows.slice(0, 2), np.zeros((2, *spec.picture_shape), np.uint8), np.zeros(2, bool))
    out = images.finish(images.start(failed))
    assert out.column("vector").null_count == 2 and out.num_rows == 2
    texts = EncodeTexts(replace(spec, device="cpu"), loaded)
    batch = pa.table({"text_hash": ["h1", "h2"], "text": ["a red cat", "a dog"]})
    started = texts.start(batch)
    assert texts.finish(started).equals(texts(batch))


def test_norm_is_the_raw_vector_length(d3_store: Store) -> None:
    encode(encode_config(d3_store, dtype="float32"))
    row = catalog.query(
        d3_store, "SELECT s.text, e.vector, e.norm FROM samples s JOIN embeddings e ON e.content_hash = s.text_hash "
        "WHERE e.modality = 'text' LIMIT 1").to_pylist()[0]
    loaded = load(ModelSpec(TINY), torch.device("cpu"))
    with torch.no_grad():
        raw = loaded.model.encode_text(loaded.tokenizer([row["text"]]))[0].numpy()
    assert row["norm"] == pytest.approx(float(np.linalg.norm(raw)), rel=1e-4)
    assert np.allclose(np.asarray(row["vector"]) * row["norm"], raw, atol=1e-4)


def test_a_file_replaced_after_ingest_is_quarantined_not_encoded(tmp_path: Path) -> None:
    root = tmp_path / "src"
    (root / "real").mkdir(parents=True)
    (root / "real" / "a.jpg").write_bytes(jpeg((10, 200, 10)))
    (root / "real" / "b.jpg").write_bytes(jpeg((200, 10, 10)))
    store = Store(tmp_path / "store")
    ingest(IngestConfig(root, "folder", store))
    (root / "real" / "b.jpg").write_bytes(jpeg((10, 10, 200)))  # a valid image, other bytes
    result = encode(encode_config(store))
    assert result.images_encoded == 1 and result.quarantined == {"changed_since_ingest": 1}
    assert _count(store, "SELECT count(*) FROM quarantine WHERE reason = 'changed_since_ingest'") == 1


_NOOP_SCRIPT = textwrap.dedent(
    """
    import sys
    from pipeline.encoding.clip import ModelSpec
    from pipeline.stages.encode import EncodeConfig, run
    from pipeline.store.layout import Store
    result = run(EncodeConfig(Store(sys.argv[1]), ModelSpec("Tiny-ViT-16"), workers=0))
    print(result.nothing_to_do, result.model_loaded, "torch" in sys.modules, "open_clip" in sys.modules)
    """
)


def test_noop_encode_loads_no_weights_and_imports_no_torch(d3_store: Store) -> None:
    encode(encode_config(d3_store))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", _NOOP_SCRIPT, str(d3_store.root)], env=env,
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "False", "False", "False"]


def test_pending_rows_stream_in_chunks_sorted_by_location(
    d3_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.stages.encode as stage

    monkeypatch.setattr(stage, "_PENDING_CHUNK", 7)
    key = load(ModelSpec(TINY), torch.device("cpu")).model_key
    path = tmp_path / "pending.parquet"
    with catalog.connect(d3_store) as con:
        n = write_pending(con, pending_images_sql(False), key, path)
    assert n == _count(d3_store, "SELECT count(DISTINCT sample_id) FROM samples")
    assert pq.ParquetFile(path).metadata.num_row_groups == -(-n // 7)
    rows = pq.read_table(path).to_pylist()
    keys = [(r["source_uri"], r["source_member"] or "", r["source_row"] or 0) for r in rows]
    assert keys == sorted(keys) and len({r["sample_id"] for r in rows}) == n


def test_hostile_inputs_are_quarantined_and_the_run_completes(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "hostile"
    gen = root / "somegen"
    gen.mkdir(parents=True)
    (gen / "ok.jpg").write_bytes(jpeg())
    (gen / "empty.jpg").write_bytes(b"")
    (gen / "text.png").write_bytes(b"I am a text file with an image suffix")
    (gen / "trunc.jpg").write_bytes(jpeg((9, 9, 200), size=64)[:300])
    Image.new("RGB", (300, 300), (1, 2, 3)).save(gen / "huge.png")
    Image.new("CMYK", (20, 20), (0, 255, 0, 0)).save(gen / "cmyk.jpg")
    Image.new("LA", (20, 20), (10, 100)).save(gen / "la.png")
    store = Store(tmp_path / "store")
    ingest(IngestConfig(root, "folder", store))
    result = encode(encode_config(store, max_pixels=200 * 200))
    assert result.images_encoded == 3  # ok, cmyk, la
    assert result.quarantined == {"empty": 1, "not_an_image": 1, "truncated": 1, "too_many_pixels": 1}
    reasons = catalog.query(store, "SELECT reason, detail FROM quarantine ORDER BY reason").to_pylist()
    assert [r["reason"] for r in reasons] == ["empty", "not_an_image", "too_many_pixels", "truncated"]
    assert "300x300" in reasons[2]["detail"]
    # quarantined inputs are not retried on every run, unless asked
    assert encode(encode_config(store, max_pixels=200 * 200)).nothing_to_do
    retry = encode(encode_config(store, retry_quarantined=True))  # default pixel limit admits huge.png
    assert retry.images_encoded == 1


def test_resume_after_kill_between_shard_write_and_catalog_update(
    d3_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:

    real_commit = writes.commit_staged
    calls = {"n": 0}

    def dying_commit(store: Store, files: list) -> list:
        calls["n"] += 1
        if calls["n"] == 3:  # the shards are staged, the catalog never hears of them
            raise KeyboardInterrupt("simulated kill")
        return real_commit(store, files)

    monkeypatch.setattr(writes, "COMMIT_EVERY_SHARDS", 1)
    monkeypatch.setattr(writes, "commit_staged", dying_commit)
    with pytest.raises(KeyboardInterrupt):
        encode(encode_config(d3_store, shard_rows=8, batch_size=8))
    assert list(d3_store.staging_dir.rglob("image-*.parquet"))  # left for the next writer
    monkeypatch.setattr(writes, "commit_staged", real_commit)
    encode(encode_config(d3_store, shard_rows=8, batch_size=8))
    _assert_complete_without_duplicates(d3_store)


def _assert_complete_without_duplicates(store: Store) -> None:
    with locked(store):
        writes.reconcile(store)
    samples = _count(store, "SELECT count(*) FROM samples")
    rows = _count(store, "SELECT count(*) FROM embeddings WHERE modality = 'image'")
    distinct = _count(store, "SELECT count(DISTINCT content_hash) FROM embeddings WHERE modality = 'image'")
    bad = _count(store, "SELECT count(DISTINCT content_hash) FROM quarantine WHERE stage = 'decode'")
    assert rows == distinct == samples - bad
    assert not list(store.root.rglob("*.tmp"))
    assert not [p for p in store.staging_dir.rglob("*") if p.is_file()]  # adopted, or swept


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import pipeline.store.atomic as atomic
    from pipeline.encoding.clip import ModelSpec
    from pipeline.stages.encode import EncodeConfig, run as encode
    from pipeline.store.layout import Store
    real_replace = os.replace
    def slow_replace(a, b):  # widen the window in which a temp file exists
        time.sleep(0.15)
        real_replace(a, b)
    atomic.os.replace = slow_replace
    encode(EncodeConfig(Store(sys.argv[1]), ModelSpec("Tiny-ViT-16"), workers=1, batch_size=4, shard_rows=4))
    print("FINISHED")
    """
)


@pytest.mark.parametrize("kill_after_shards", [1, 4])
def test_sigkill_at_any_moment_then_rerun(tmp_path: Path, kill_after_shards: int) -> None:
    data = make_d3(tmp_path / "src", rows=16, size=32)
    store = Store(tmp_path / "store")
    ingest(IngestConfig(data.parquet, "d3", store, real_images=data.real_images))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(store.root)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    shard_dir = store.root  # staged or committed
    killed = kill_when(proc, lambda: len(list(shard_dir.rglob("image-*.parquet"))) >= kill_after_shards, 120)
    assert killed, "the encode finished before it could be killed: " + proc.stderr.read().decode()[-500:]
    encode(encode_config(store))
    _assert_complete_without_duplicates(store)


def test_workers_decode_in_other_processes(d3: SyntheticD3, d3_store: Store) -> None:
    result = encode(encode_config(d3_store, workers=2))
    assert result.images_encoded == _count(d3_store, "SELECT count(*) FROM samples") - 1


def test_bad_arguments_are_sentences(d3_store: Store) -> None:
    with pytest.raises(PipelineError, match="fp16 needs a GPU"):
        encode(encode_config(d3_store, precision="fp16", device="cpu"))
    with pytest.raises(PipelineError, match="--precision must be one of"):
        encode(encode_config(d3_store, precision="int4"))
    with pytest.raises(PipelineError, match="Unknown open_clip model"):
        encode(encode_config(d3_store).__class__(d3_store, ModelSpec("No-Such-Model"), workers=0))
    with pytest.raises(PipelineError, match="does not exist"):
        encode(encode_config(d3_store).__class__(d3_store, ModelSpec(TINY, "/nope/ckpt.pt"), workers=0))


def test_local_checkpoint_is_loaded_and_keyed_by_digest(d3_store: Store, tmp_path: Path) -> None:
    loaded = load(ModelSpec(TINY, seed=7), torch.device("cpu"))
    ckpt = tmp_path / "tiny.pt"
    torch.save(loaded.model.state_dict(), ckpt)
    from_file = load(ModelSpec(TINY, str(ckpt)), torch.device("cpu"))
    assert "__ckpt-" in from_file.model_key and not from_file.info["random_weights"]
    for a, b in zip(loaded.model.state_dict().values(), from_file.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_noop_with_an_unchanged_checkpoint_does_not_hash_it_again(
    d3_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.encoding.clip as clip

    ckpt = tmp_path / "tiny.pt"
    torch.save(load(ModelSpec(TINY, seed=3), torch.device("cpu")).model.state_dict(), ckpt)
    config = encode_config(d3_store).__class__(d3_store, ModelSpec(TINY, str(ckpt)), workers=0)
    assert not encode(config).nothing_to_do

    def no_hashing(path: Path) -> str:
        raise AssertionError("the checkpoint was hashed again")

    monkeypatch.setattr(clip, "_file_digest", no_hashing)
    assert encode(config).nothing_to_do
    os.utime(ckpt, ns=(1, 1))  # touched: now it must be hashed (and the hash finds the same key)
    with pytest.raises(AssertionError, match="hashed again"):
        encode(config)


def test_each_model_key_has_its_own_cache(d3_store: Store) -> None:
    first = encode(encode_config(d3_store))
    other = encode(encode_config(d3_store).__class__(d3_store, ModelSpec(TINY, seed=1), workers=0))
    assert other.model_key != first.model_key and other.images_encoded == first.images_encoded
    per_key = catalog.query(
        d3_store, "SELECT model_key, count(*) AS n FROM embeddings GROUP BY 1 ORDER BY 1"
    ).to_pylist()
    assert [r["n"] for r in per_key] == [first.images_encoded + first.texts_encoded] * 2
    assert sorted(catalog.model_keys(d3_store)) == sorted([first.model_key, other.model_key])


def _tiny_pixels(loaded, n: int = 4) -> torch.Tensor:
    size = loaded.info["preprocess"]["image_size"]
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(0))


TEXTS = ["a photo of a cat", "a red city at night", "x", "a portrait of a dog at sunset, oil painting"]


@pytest.mark.parametrize("bf16_weights", [True, False])
def test_bf16_vectors_agree_with_fp32_and_leave_the_fp32_model_alone(bf16_weights: bool) -> None:
    from pipeline.encoding.units import Encoder

    cpu = torch.device("cpu")
    loaded = load(ModelSpec(TINY), cpu)
    pixels = _tiny_pixels(loaded)
    fp32 = Encoder(loaded, cpu, "fp32")
    before, texts_before = fp32.images(pixels), fp32.texts(TEXTS)
    bf16 = Encoder(loaded, cpu, "bf16", bf16_weights=bf16_weights)
    assert bf16.bf16_weights is bf16_weights
    assert next(bf16.model.parameters()).dtype == (torch.bfloat16 if bf16_weights else torch.float32)
    cosines = np.concatenate([(bf16.images(pixels) * before).sum(1), (bf16.texts(TEXTS) * texts_before).sum(1)])
    assert cosines.min() > 0.99 and cosines.max() < 1 + 1e-3
    # the shared model is still fp32, bit for bit: an fp32 encoder made afterwards gives the same vectors
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert np.array_equal(Encoder(loaded, cpu, "fp32").images(pixels), before)


def test_bf16_weights_only_where_the_cpu_computes_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.encoding import units

    cpu = torch.device("cpu")
    loaded = load(ModelSpec(TINY), cpu)
    monkeypatch.setattr(units, "cpu_bf16_native", lambda: False)
    assert not units.Encoder(loaded, cpu, "bf16").bf16_weights  # emulated bf16: autocast, as before
    monkeypatch.setattr(units, "cpu_bf16_native", lambda: True)
    assert units.Encoder(loaded, cpu, "bf16").bf16_weights
    assert not units.Encoder(loaded, cpu, "fp32").bf16_weights


def test_a_model_nobody_shares_is_cast_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.encoding import units

    monkeypatch.setattr(units, "cpu_bf16_native", lambda: True)
    loaded = load(ModelSpec(TINY), torch.device("cpu"))
    encoder = units.Encoder(loaded, torch.device("cpu"), "bf16", shared=False)
    assert encoder.model is loaded.model and next(loaded.model.parameters()).dtype == torch.bfloat16


def test_encode_in_bf16_through_the_command_matches_fp32(d3: SyntheticD3, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    vectors = {}
    for precision in ("fp32", "bf16"):
        store = Store(tmp_path / precision)
        ingest(IngestConfig(d3.parquet, "d3", store, real_images=d3.real_images))
        done = CliRunner().invoke(app, ["encode", "--model", TINY, "--store", str(store.root), "--workers", "0",
                                        "--precision", precision])
        assert done.exit_code == 0, done.output
        table = catalog.query(store, "SELECT content_hash, vector FROM embeddings ORDER BY modality, content_hash")
        vectors[precision] = np.stack(table.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    assert vectors["fp32"].shape == vectors["bf16"].shape and len(vectors["fp32"]) > 20
    assert (vectors["fp32"] * vectors["bf16"]).sum(1).min() > 0.99


def test_the_cpu_model_runs_on_the_cores_left_idle_and_the_count_is_restored(
        d3_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.engines import local

    limits: list[int] = []
    seen: list[int] = []

    def choose(limit: int) -> tuple[int, str]:
        limits.append(limit)
        return 1, "1 thread: test"

    start = EncodeImages.start
    monkeypatch.setattr(local, "choose_threads", choose)
    monkeypatch.setattr(EncodeImages, "start", lambda self, batch: (seen.append(torch.get_num_threads()),
                                                                     start(self, batch))[1])
    before = torch.get_num_threads()
    result = encode(encode_config(d3_store, device="cpu"))
    assert result.images_encoded > 0 and seen and set(seen) == {1}
    assert limits and set(limits) == {before}  # never more threads than torch had
    assert torch.get_num_threads() == before
