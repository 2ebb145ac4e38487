"""Precomputed features come in without re-encoding, from both supported layouts."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import PipelineError
from pipeline.stages.import_features import ImportConfig
from pipeline.stages.import_features import run as import_features
from pipeline.store import catalog, writes
from pipeline.store.layout import Store
from tests.conftest import jpeg


def _count(store: Store, sql: str) -> int:
    return catalog.query(store, sql).column(0)[0].as_py()


def test_reference_h5_layout(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(0)
    src = tmp_path / "h5"
    src.mkdir()
    for f in range(2):
        with h5py.File(src / f"{f:04d}.h5", "w") as h:
            for name in ["real", "image_gen0", "image_gen1", "image_gen2", "image_gen3"]:
                h[name] = rng.normal(size=(3, 8)).astype(np.float32)
            h["original_prompt"] = rng.normal(size=(3, 8)).astype(np.float32)
            h["positive_prompt"] = rng.normal(size=(3, 8)).astype(np.float32)
    store = Store(tmp_path / "store")
    result = import_features(ImportConfig(src, "h5", store, "ViT-L-14__openai__imported"))
    assert result.samples_added == 2 * 3 * 5
    assert _count(store, "SELECT count(*) FROM embeddings WHERE modality = 'image'") == 30
    # one real caption + one prompt per row: 12 text vectors, shared by the 4 generated images
    assert _count(store, "SELECT count(*) FROM embeddings WHERE modality = 'text'") == 12
    joined = _count(store, "SELECT count(*) FROM samples s JOIN embeddings e ON e.content_hash = s.text_hash")
    assert joined == 30
    norms = catalog.query(store, "SELECT list_dot_product(vector, vector) FROM embeddings").column(0).to_pylist()
    assert np.allclose(norms, 1.0, atol=3e-3)
    splits = catalog.query(store, "SELECT group_key, count(DISTINCT split) FROM samples GROUP BY 1").to_pylist()
    assert len(splits) == 6 and all(list(r.values())[1] == 1 for r in splits)
    again = import_features(ImportConfig(src, "h5", store, "ViT-L-14__openai__imported"))
    assert again.samples_added == again.vectors_added == 0
    # generator names given as Hugging Face ids land under the canonical names ingest uses
    other = Store(tmp_path / "other")
    hf = ("DeepFloyd/IF-I-M-v1.0", "stabilityai/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-xl-base-1.0",
          "CompVis/stable-diffusion-v1-4")  # D3's model_gen0..3
    named = import_features(ImportConfig(src, "h5", other, "ViT-L-14__openai__imported", generators=hf))
    assert named.generator_warnings == []
    names = catalog.query(other, "SELECT DISTINCT generator, generator_original FROM samples ORDER BY 1").to_pylist()
    assert [(r["generator"], r["generator_original"]) for r in names] == [
        ("deepfloyd-if", hf[0]), ("real", "real"), ("sd-1.4", hf[3]), ("sd-2.1", hf[1]), ("sd-xl", hf[2])]


def test_clip_retrieval_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    root = tmp_path / "cr"
    for sub in ("img_emb", "text_emb", "metadata", "images"):
        (root / sub).mkdir(parents=True)
    (root / "images" / "a.jpg").write_bytes(jpeg((3, 3, 3)))
    np.save(root / "img_emb" / "img_emb_0.npy", rng.normal(size=(2, 16)).astype(np.float16))
    np.save(root / "text_emb" / "text_emb_0.npy", rng.normal(size=(2, 16)).astype(np.float16))
    pq.write_table(pa.table({"image_path": ["images/a.jpg", "gone/b.jpg"], "caption": ["cap a", "cap b"]}),
                   root / "metadata" / "metadata_0.parquet")
    store = Store(tmp_path / "store")
    with pytest.raises(PipelineError, match="--generator"):
        import_features(ImportConfig(root, "clip-retrieval", store, "ViT-B-32__laion"))
    result = import_features(ImportConfig(root, "clip-retrieval", store, "ViT-B-32__laion", generator="real"))
    assert result.samples_added == 2 and result.vectors_added == 4
    rows = {r["text"]: r for r in catalog.query(store, "SELECT * FROM samples").to_pylist()}
    import hashlib

    assert rows["cap a"]["sample_id"] == hashlib.sha256(jpeg((3, 3, 3))).hexdigest()
    assert rows["cap a"]["source_format"] == "clip-retrieval"  # still encodable by other models
    assert rows["cap b"]["source_format"] == "features:clip-retrieval"
    assert rows["cap b"]["text_hash"] == hashlib.sha256(b"cap b").hexdigest()
    again = import_features(ImportConfig(root, "clip-retrieval", store, "ViT-B-32__laion", generator="real"))
    assert (again.units_skipped, again.units_read) == (1, 0)
    np.save(root / "img_emb" / "img_emb_0.npy", rng.normal(size=(2, 16)).astype(np.float16))  # new vectors
    changed = import_features(ImportConfig(root, "clip-retrieval", store, "ViT-B-32__laion", generator="real"))
    assert (changed.units_read, changed.samples_added, changed.vectors_added) == (1, 1, 1)  # b's id is its vector's


def cli_imported_store(tmp_path: Path, rows: int) -> str:
    """A store made as a user would: `pipeline import-features` of one HDF5 file of `rows` D3 rows
    (8-d vectors, model key `m`). Returns the store's path."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    _h5(tmp_path / "h5" / "0000.h5", rows=rows, image_dim=8, text_dim=8)
    store = str(tmp_path / "store")
    done = CliRunner().invoke(app, ["import-features", str(tmp_path / "h5"), "--layout", "h5", "--store", store,
                                    "--model-key", "m"])
    assert done.exit_code == 0, done.output
    return store


def _h5(path: Path, rows: int, image_dim: int, text_dim: int, seed: int = 0) -> None:
    import h5py

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h:
        for name in ["real", "image_gen0", "image_gen1", "image_gen2", "image_gen3"]:
            h[name] = (rng.normal(size=(rows, image_dim)) * 7).astype(np.float32)
        h["original_prompt"] = rng.normal(size=(rows, text_dim)).astype(np.float32)
        h["positive_prompt"] = rng.normal(size=(rows, text_dim)).astype(np.float32)


def test_norms_are_kept_and_image_and_text_sizes_may_differ(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    from pipeline.features.loader import FeatureLoader, LoaderConfig
    from pipeline.features.view import feature_table

    _h5(tmp_path / "src" / "0000.h5", rows=20, image_dim=12, text_dim=5)
    store = Store(tmp_path / "store")
    import_features(ImportConfig(tmp_path / "src", "h5", store, "mixed"))
    norms = catalog.query(store, "SELECT modality, min(norm), max(norm) FROM embeddings GROUP BY 1 ORDER BY 1"
                          ).to_pylist()
    assert [r["modality"] for r in norms] == ["image", "text"]
    assert 10 < norms[0]["min(norm)"] < norms[0]["max(norm)"] < 40  # ≈ 7·√12, not 1
    table = feature_table(store, "mixed")
    assert (table.dim, table.text_dim) == (12, 5)
    batch = next(FeatureLoader(table, ("train", "val", "test"), LoaderConfig(batch_size=100)).epoch(0))
    assert batch.x.shape == (100, 17)
    _h5(tmp_path / "other" / "0001.h5", rows=5, image_dim=12, text_dim=6, seed=1)
    with pytest.raises(PipelineError, match="12-d \\(image\\) and 6-d \\(text\\)"):
        import_features(ImportConfig(tmp_path / "other", "h5", store, "mixed"))


def test_a_reimport_adds_nothing_and_a_grown_source_adds_only_its_new_rows(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    _h5(tmp_path / "src" / "0000.h5", rows=6, image_dim=8, text_dim=8)
    store = Store(tmp_path / "store")
    first = import_features(ImportConfig(tmp_path / "src", "h5", store, "m"))
    assert (first.samples_added, first.vectors_added, first.units_read) == (30, 30 + 12, 1)
    again = import_features(ImportConfig(tmp_path / "src", "h5", store, "m"))
    assert (again.samples_added, again.vectors_added, again.units_read, again.units_skipped) == (0, 0, 0, 1)
    _h5(tmp_path / "src" / "0001.h5", rows=4, image_dim=8, text_dim=8, seed=2)
    grown = import_features(ImportConfig(tmp_path / "src", "h5", store, "m"))
    assert (grown.samples_added, grown.vectors_added, grown.already_present) == (20, 20 + 8, 0)
    assert (grown.units_read, grown.units_skipped) == (1, 1)
    assert _count(store, "SELECT count(*) FROM samples") == 50


def test_an_unchanged_file_is_not_opened_and_a_changed_one_adds_only_new_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("h5py")
    import os

    from pipeline.stages import import_features as module

    src = tmp_path / "src"
    _h5(src / "0000.h5", rows=6, image_dim=8, text_dim=8)
    _h5(src / "0001.h5", rows=3, image_dim=8, text_dim=8, seed=1)
    store = Store(tmp_path / "store")
    import_features(ImportConfig(src, "h5", store, "m"))
    real_slices = module._h5_slices
    opened: list[str] = []

    def watched(config: ImportConfig, unit: object, now: object) -> object:
        opened.append(unit.path.name)  # type: ignore[attr-defined]
        return real_slices(config, unit, now)  # type: ignore[arg-type]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an unchanged file was opened")

    import h5py

    monkeypatch.setattr(h5py, "File", refuse)
    noop = import_features(ImportConfig(src, "h5", store, "m"))
    assert (noop.units_skipped, noop.units_read, noop.samples_added) == (2, 0, 0)
    monkeypatch.undo()
    # other options (another model key) are another import: read again
    monkeypatch.setattr(module, "_h5_slices", watched)
    other = import_features(ImportConfig(src, "h5", store, "m2"))
    assert sorted(opened) == ["0000.h5", "0001.h5"] and other.vectors_added == 45 + 18
    assert other.samples_added == 0 and other.already_present == 45
    # touched (same bytes, new time): read again, adds nothing
    opened.clear()
    st = (src / "0001.h5").stat()
    os.utime(src / "0001.h5", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = import_features(ImportConfig(src, "h5", store, "m"))
    assert opened == ["0001.h5"] and (touched.samples_added, touched.vectors_added) == (0, 0)
    assert touched.already_present == 15
    # rewritten with two more rows: only those are new. The file is one random stream, so its new
    # `real` rows 3-4 are the vectors the old file had as image_gen0 rows 0-1: the same content labelled
    # real and generated, quarantined as label_conflict (the stored twins keep their label)
    opened.clear()
    _h5(src / "0001.h5", rows=5, image_dim=8, text_dim=8, seed=1)
    grown = import_features(ImportConfig(src, "h5", store, "m"))
    assert opened == ["0001.h5"] and grown.samples_added == 10 and grown.already_present == 13
    assert grown.label_conflicts == 2 and grown.quarantined == {"label_conflict": 2}
    assert _count(store, "SELECT count(*) FROM samples_all") == 55
    assert _count(store, "SELECT count(*) FROM samples") == _count(
        store, "SELECT count(DISTINCT sample_id) FROM samples") == 55
    assert _count(store, "SELECT count(*) FROM conflicts WHERE status = 'open' AND label IS NOT NULL") == 2


def test_the_store_is_scanned_once_per_run_not_once_per_slice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("h5py")
    import shutil

    from pipeline.stages import import_features as module
    from pipeline.store import keys

    src = tmp_path / "src"
    _h5(src / "0000.h5", rows=7, image_dim=8, text_dim=8)
    store = Store(tmp_path / "store")
    import_features(ImportConfig(src, "h5", store, "m"))
    # a second folder: a copy of the first file (every row known) and a new one, read 2 rows at a time
    _h5(tmp_path / "more" / "0000.h5", rows=7, image_dim=8, text_dim=8)
    _h5(tmp_path / "more" / "0001.h5", rows=5, image_dim=8, text_dim=8, seed=3)
    _h5(tmp_path / "more" / "0002.h5", rows=5, image_dim=8, text_dim=8, seed=3)  # the same rows again
    monkeypatch.setattr(module, "SLICE_ROWS", 2)
    scans: list[tuple[keys.KeyQuery, list[Path]]] = []
    real = keys._scan
    monkeypatch.setattr(keys, "_scan", lambda query, paths, scratch: scans.append((query, paths)) or real(
        query, paths, scratch))
    shutil.rmtree(store.root / "cache" / "keys")  # no key sets kept from the first import: each built once
    result = import_features(ImportConfig(tmp_path / "more", "h5", store, "m"))
    # the ledger, sample ids, image and text hashes, and (id, label) pairs (this folder repeats stored ids)
    assert len(scans) == len({q for q, _ in scans}) == 5
    assert (result.samples_added, result.already_present, result.units_read) == (25, 35 + 25, 3)
    assert result.vectors_added == 25 + 10
    assert _count(store, "SELECT count(*) FROM samples") == _count(
        store, "SELECT count(DISTINCT sample_id) FROM samples") == 60
    first = catalog.query(store, "SELECT sample_id FROM samples WHERE source_row = 0 AND source_member = 'real' "
                          "AND source_uri LIKE '%src%'").column(0)[0].as_py()
    import h5py

    with h5py.File(src / "0000.h5") as h:
        assert first == module.vector_hash("image", np.asarray(h["real"][0], np.float32))


def test_kept_key_sets_make_a_new_file_cost_only_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("h5py")
    from pipeline.store import catalog as catalog_module
    from pipeline.store import keys
    from pipeline.store.writes import writing

    store = Store(tmp_path / "store")
    _h5(tmp_path / "src" / "0000.h5", rows=7, image_dim=8, text_dim=8)
    import_features(ImportConfig(tmp_path / "src", "h5", store, "m"))
    scanned: list[Path] = []
    real = keys._scan
    monkeypatch.setattr(keys, "_scan", lambda query, paths, scratch: scanned.extend(paths) or real(
        query, paths, scratch))
    _h5(tmp_path / "src" / "0001.h5", rows=3, image_dim=8, text_dim=8, seed=1)
    assert import_features(ImportConfig(tmp_path / "src", "h5", store, "m")).samples_added == 15
    assert scanned and {p.parent.name for p in scanned} == {"sources"}  # only the ledger row not yet kept
    # a samples shard set aside (as `verify --repair` does): the sets are built again, nothing is lost
    scanned.clear()
    lost = catalog_module.shard_paths(store, "samples")[0]
    with writing(store):
        writes.forget(store, [lost])
    lost.unlink()
    ledger = catalog_module.shard_paths(store, "sources")
    with writing(store):  # and the ledger reset, as verify does (a vanished shard is damage, not forgotten)
        writes.forget(store, ledger)
    for shard in ledger:
        shard.unlink()
    with writing(store):
        writes.reconcile(store)
    again = import_features(ImportConfig(tmp_path / "src", "h5", store, "m"))
    assert again.samples_added == 35 and {p.parent.name for p in scanned} >= {"samples"}
    assert _count(store, "SELECT count(*) FROM samples") == _count(
        store, "SELECT count(DISTINCT sample_id) FROM samples") == 50


def _half_edges() -> np.ndarray:
    """float32 values where float32 → float16 can go wrong: every half's float32 image, one float32
    ulp either side, the exact midpoints between neighbouring halves (ties: round to even), values
    past the largest half, and float32 subnormals and zeros."""
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    images = halves[np.isfinite(halves)].astype(np.float32)
    ordered = np.unique(images)
    ties = ordered[:-1] + (ordered[1:] - ordered[:-1]) / np.float32(2)
    past = np.array([65504, 65519.99, 65520, 65536, 1e30, np.inf, -np.inf], np.float32)
    tiny = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-40, 2.98e-8, 2.99e-8, 5.96e-8], np.float32)
    near = np.concatenate([np.nextafter(images, np.float32(np.inf)), np.nextafter(images, np.float32(-np.inf))])
    return np.concatenate([images, ties, near, past, -past, tiny])


def test_the_vectorised_cast_gives_numpys_bits_for_every_half_and_the_edges_of_rounding() -> None:
    from pipeline.features.vectors import TORCH_CAST_MIN as _TORCH_CAST_MIN
    from pipeline.features.vectors import cast_into as _cast_into

    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    assert halves.size >= _TORCH_CAST_MIN  # the torch path, not numpy's fallback
    wide = np.empty(halves.shape, np.float32)
    _cast_into(wide, halves)
    expected = halves.astype(np.float32)
    not_nan = ~np.isnan(halves)
    assert np.array_equal(wide.view(np.uint32)[not_nan], expected.view(np.uint32)[not_nan])  # every half, ±0, ±inf
    assert np.isnan(wide[~not_nan]).all()
    edges = _half_edges()
    narrow = np.empty(edges.shape, np.float16)
    _cast_into(narrow, edges)
    assert np.array_equal(narrow.view(np.uint16), edges.astype(np.float16).view(np.uint16))


def test_slices_are_numpys_bytes_and_ids_with_nan_infinity_and_subnormals(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_unit_rows` (torch casts, squares in a buffer) against the plain numpy path it replaced: the
    vectors, norms and `vector_hash` ids byte for byte, for float16 and float32 sources. torch casts
    the values past a multiple of its vector width one at a time and gives every NaN there as
    0x7fffffff (numpy keeps the sign): the last value of the slice is such a NaN."""
    from pipeline.features.vectors import normalise
    from pipeline.stages import import_features as module

    dim = 257  # odd: the last block (31 rows) ends in torch's one-at-a-time tail
    monkeypatch.setattr(module, "_BLOCK_BYTES", 64 * 3 * dim * 4)  # blocks of 64 rows: several per slice
    from pipeline.features import vectors

    monkeypatch.setattr(vectors, "TORCH_CAST_MIN", 1024)
    rng = np.random.default_rng(5)
    for source_dtype in (np.float16, np.float32):
        sets = [rng.normal(scale=s, size=(300, dim)).astype(source_dtype) for s in (1.0, 1e-3, 300.0)]
        sets[1][:40, :] = rng.normal(scale=1e-6, size=(40, dim)).astype(source_dtype)  # float16 subnormals
        sets[0][70, 5] = np.nan  # a NaN in the second block, infinities in the third
        sets[2][140, 9], sets[2][141, 0] = np.inf, -np.inf
        sets[0][200] = 0  # a zero vector stays zero
        signalling = np.array([0x7C01, 0xFE00], np.uint16).view(np.float16)
        sets[1][250, :] = signalling[np.arange(dim) % 2]  # NaN payloads
        sets[2][289, -1] = signalling[1]  # -NaN, the slice's last value
        for dtype in ("float16", "float32"):
            with np.errstate(invalid="ignore"):
                got = module._unit_rows("image", sets, 3, 290, dtype)
                raw = np.stack([s[3:290] for s in sets], 1).reshape(-1, dim).astype(np.float32)
                units = normalise(raw)
                assert np.array_equal(got.vectors.view(np.uint8), units.astype(dtype).view(np.uint8))
                assert np.array_equal(got.norms.view(np.uint32), np.linalg.norm(raw, axis=1).view(np.uint32))
                assert got.hashes.to_pylist() == [module.vector_hash("image", v) for v in raw]


def test_clip_retrieval_vectors_are_numpys_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.features import vectors
    from pipeline.features.vectors import normalise
    from pipeline.stages import import_features as module

    monkeypatch.setattr(vectors, "TORCH_CAST_MIN", 64)
    rng = np.random.default_rng(6)
    clean = rng.normal(size=(3, 4101)).astype(np.float16)
    with_nan = clean.copy()
    with_nan[-1, -1] = np.array(0xFE00, np.uint16).view(np.float16)  # -NaN in torch's one-at-a-time tail
    for values in (clean, with_nan, clean.astype(np.float32), with_nan.astype(np.float32)):
        with np.errstate(invalid="ignore"):
            units, norms, exact = module._unit_vectors(values)
            expected = normalise(values)
            assert np.array_equal(units.view(np.uint32), expected.view(np.uint32))
            assert np.array_equal(norms.view(np.uint32), np.linalg.norm(values.astype(np.float32), axis=1).view(
                np.uint32))
            for dtype in ("float16", "float32"):
                assert np.array_equal(module._as_stored(units, dtype, exact).view(np.uint8),
                                      expected.astype(dtype).view(np.uint8))


def test_a_vector_under_both_labels_is_a_conflict_across_slices_and_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h5py = pytest.importorskip("h5py")
    from pipeline.stages import import_features as module

    monkeypatch.setattr(module, "SLICE_ROWS", 2)  # rows 0-1 and 2-3 are read, checked and committed apart
    rng = np.random.default_rng(4)
    sets = {name: rng.normal(size=(4, 8)).astype(np.float32) for name in
            ["real", "image_gen0", "image_gen1", "image_gen2", "image_gen3", "original_prompt", "positive_prompt"]}
    sets["image_gen2"][3] = sets["real"][0]  # slice 2 brings slice 1's real image as a generated one
    (tmp_path / "a").mkdir()
    with h5py.File(tmp_path / "a" / "0000.h5", "w") as h:
        for name, values in sets.items():
            h[name] = values
    store = Store(tmp_path / "store")
    first = import_features(ImportConfig(tmp_path / "a", "h5", store, "m"))
    assert first.label_conflicts == 1 and first.quarantined == {"label_conflict": 1}
    assert first.samples_added == 19  # the generated copy is not added; the real one keeps its label
    conflict = catalog.query(store, "SELECT * FROM quarantine").to_pylist()[0]
    assert (conflict["stage"], conflict["source_member"], conflict["source_row"]) == ("import", "image_gen2", 3)
    assert "labelled generated" in conflict["detail"] and "and real at" in conflict["detail"]
    assert _count(store, "SELECT count(*) FROM samples") == 19
    # another file brings a stored generated image as a real one: a conflict with the store
    (tmp_path / "b").mkdir()
    with h5py.File(tmp_path / "b" / "0001.h5", "w") as h:
        for name, values in sets.items():
            h[name] = values[1:2] if name != "real" else sets["image_gen0"][2:3]
    second = import_features(ImportConfig(tmp_path / "b", "h5", store, "m"))
    assert second.label_conflicts == 1 and second.already_present == 4
    assert _count(store, "SELECT count(*) FROM samples") == 19
    # nothing of what was left out has a vector: status counts vectors as encoded samples
    assert _count(store, "SELECT count(*) FROM embeddings WHERE modality = 'image' AND content_hash NOT IN "
                  "(SELECT sample_id FROM samples_all)") == 0
