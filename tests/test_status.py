"""`pipeline status` adds up the manifest's per-shard counts and prints what scanning every row would."""

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.stages.encode import run as encode
from pipeline.stages.ingest import IngestConfig
from pipeline.stages.ingest import run as ingest
from pipeline.stages.status import StatusConfig, StoreStatus
from pipeline.stages.status import run as status
from pipeline.store import catalog
from pipeline.store import manifest as manifests
from pipeline.store.layout import Store
from pipeline.synthetic import SyntheticD3
from tests.conftest import encode_config, jpeg


def _scanned(store: Store) -> dict[str, Any]:
    """The numbers as status computed them before the manifest kept counts: by scanning rows."""
    def one(sql: str, params: list[object] | None = None) -> Any:
        return catalog.query(store, sql, params).column(0)[0].as_py()

    images_total = one("SELECT count(DISTINCT sample_id) FROM samples WHERE source_format NOT LIKE 'features:%'")
    texts_total = one("SELECT count(DISTINCT text_hash) FROM samples")
    models = []
    for key in catalog.model_keys(store):
        row = catalog.query(store, """
            SELECT
              count(DISTINCT e.content_hash) FILTER (WHERE e.modality = 'image' AND s.sample_id IS NOT NULL),
              (SELECT count(DISTINCT content_hash) FROM embeddings
                 WHERE model_key = ? AND modality = 'text' AND content_hash IN (SELECT text_hash FROM samples)),
              (SELECT count(DISTINCT q.content_hash) FROM quarantine q WHERE q.stage = 'decode')
            FROM embeddings e LEFT JOIN samples s ON s.sample_id = e.content_hash
            WHERE e.model_key = ?""", [key, key]).to_pylist()[0]
        images, texts, bad = row.values()
        models.append((key, images, max(0, images_total - images - bad), texts, max(0, texts_total - texts)))
    return {
        "samples": one("SELECT count(*) FROM samples"),
        "groups": catalog.query(store, "SELECT split, label, generator, count(*) AS samples FROM samples "
                                "GROUP BY ALL ORDER BY split, label, generator").to_pylist(),
        "quarantine": catalog.query(store, "SELECT stage, reason, count(*) AS inputs FROM quarantine "
                                    "GROUP BY ALL ORDER BY stage, reason").to_pylist(),
        "models": models,
        "without_text": one("SELECT count(*) FROM samples WHERE text_hash IS NULL"),
    }


def _shown(result: StoreStatus) -> dict[str, Any]:
    return {
        "samples": result.samples,
        "groups": result.by_split_label_generator.to_pylist(),
        "quarantine": result.quarantine_by_reason.to_pylist(),
        "models": [(m.model_key, m.images_encoded, m.images_pending, m.texts_encoded, m.texts_pending)
                   for m in result.models],
        "without_text": result.without_text,
    }


def test_status_counts_are_what_a_scan_of_every_row_gives(
        tmp_path: Path, d3: SyntheticD3, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("h5py")
    from pipeline.stages.import_features import ImportConfig
    from pipeline.stages.import_features import run as import_features
    from tests.test_import_features import _h5

    store = Store(tmp_path / "store")
    ingest(IngestConfig(d3.parquet, "d3", store, real_images=d3.real_images))
    encode(encode_config(store))
    # then: a generated image of the store given again as real (a label conflict: neither copy counts),
    # a new image not encoded yet, one without a caption, and features-only samples of another model
    cell = pq.read_table(d3.parquet, columns=["image_gen2"]).column(0)[3].as_py()
    folder = tmp_path / "more"
    (folder / "real").mkdir(parents=True)
    (folder / "real" / "again.png").write_bytes(cell["bytes"])
    (folder / "real" / "again.txt").write_text("a caption")
    (folder / "sd-xl").mkdir()  # a real photograph (its caption no other sample's) given as generated
    (folder / "sd-xl" / "photo.jpg").write_bytes(sorted(d3.real_images.glob("*.jpg"))[0].read_bytes())
    (folder / "real" / "new.jpg").write_bytes(jpeg((1, 2, 3)))
    (folder / "real" / "mute.jpg").write_bytes(jpeg((9, 9, 9)))
    (folder / "real" / "mute.txt").write_text("   ")
    ingest(IngestConfig(folder, "folder", store))
    _h5(tmp_path / "h5" / "0000.h5", rows=4, image_dim=8, text_dim=8)
    import_features(ImportConfig(tmp_path / "h5", "h5", store, "imported"))
    conflicts = "SELECT content_hash FROM quarantine WHERE reason = 'label_conflict'"
    assert catalog.query(store, f"SELECT count(DISTINCT content_hash) FROM ({conflicts})").column(0)[0].as_py() == 2
    expected = _scanned(store)
    assert expected["models"][1][2] > 0  # images are pending for the encoded model
    assert expected["without_text"] >= 1
    assert _shown(status(StatusConfig(store))) == expected
    # the counts come from the manifest: no shard is read to count it
    monkeypatch.setattr(manifests, "count_rows", lambda *a: pytest.fail("a shard was read to count it"))
    assert _shown(status(StatusConfig(store))) == expected


def test_a_manifest_without_counts_is_counted_from_the_shards_then_filled_in(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    import json

    from pipeline.stages.import_features import ImportConfig
    from pipeline.stages.import_features import run as import_features
    from tests.test_import_features import _h5

    _h5(tmp_path / "h5" / "0000.h5", rows=6, image_dim=8, text_dim=8)
    store = Store(tmp_path / "store")
    import_features(ImportConfig(tmp_path / "h5", "h5", store, "m"))
    data = json.loads(store.manifest_path.read_text())
    for entry in data["shards"].values():
        entry.pop("counts", None)  # as an older pipeline wrote it
    store.manifest_path.write_text(json.dumps(data))
    expected = _scanned(store)
    assert _shown(status(StatusConfig(store))) == expected
    _h5(tmp_path / "h5" / "0001.h5", rows=2, image_dim=8, text_dim=8, seed=4)
    import_features(ImportConfig(tmp_path / "h5", "h5", store, "m"))  # a writer fills the counts in
    assert all(s.counts is not None for s in manifests.read_manifest(store).shards.values()
               if s.dataset in manifests.COUNTED)
    assert _shown(status(StatusConfig(store))) == _scanned(store)
    assert np.sum([g["samples"] for g in _scanned(store)["groups"]]) == 40


def test_status_counts_samples_without_text_not_captions(tmp_path: Path) -> None:
    """Imported features carry a text vector (and its hash) but no caption: image+text training uses
    them, so `pipeline status` does not say they have no text; a sample with no caption at all it does."""
    pytest.importorskip("h5py")
    from typer.testing import CliRunner

    from pipeline.cli import app
    from tests.test_import_features import _h5

    _h5(tmp_path / "h5" / "0000.h5", rows=6, image_dim=8, text_dim=8)
    store = tmp_path / "store"
    runner = CliRunner()
    imported = runner.invoke(app, ["import-features", str(tmp_path / "h5"), "--layout", "h5",
                                   "--store", str(store), "--model-key", "m"])
    assert imported.exit_code == 0, imported.output
    assert catalog.query(Store(store), "SELECT count(*) FROM samples WHERE text IS NULL").column(0)[0].as_py() == 30
    shown = runner.invoke(app, ["status", "--store", str(store)])
    assert shown.exit_code == 0, shown.output
    assert "30 samples" in shown.output and "no text" not in shown.output and "no caption" not in shown.output
    folder = tmp_path / "more" / "real"
    folder.mkdir(parents=True)
    (folder / "mute.jpg").write_bytes(jpeg((9, 9, 9)))  # no caption file: no text at all
    (folder / "said.jpg").write_bytes(jpeg((1, 9, 9)))
    (folder / "said.txt").write_text("a caption")
    assert runner.invoke(app, ["ingest", str(tmp_path / "more"), "--format", "folder",
                               "--store", str(store)]).exit_code == 0
    shown = runner.invoke(app, ["status", "--store", str(store)])
    assert shown.exit_code == 0, shown.output
    assert "1 samples have no text" in " ".join(shown.output.split())
