"""Shortcut checks a run makes of its own rows before it is written: can the text alone, or the image
file alone, tell real from generated?

- Text probe: Fisher's linear discriminant on the text vectors the run reads (its pairing, its input
  normalisation), fitted on train, scored on test, AUC with the run's group-bootstrap interval
  (`bootstrap.split_rng(seed, "test")`). A closed form, w = (S_w + λI)⁻¹ (μ₁ − μ₀): one d × d solve,
  no learning rate or epochs, so the same rows always give the same number. It also counts how many
  groups hold both a real and a generated image (whether `--pairing shared` can remove a shortcut).
- Format probe: each sampled image's file format, JPEG quality, size, bytes per pixel and file size,
  read from its bytes; each cue alone (and format, quality and size together) is looked up on train
  and scored on test: categorical cues by their rate of generated images on train, continuous ones in
  the direction train ranks them.

Both read a bounded sample of each split, chosen by content (the same rows for the same data in any
store): the text probe whole groups (a split's first rows by the MD5 of their group key, at most
`TEXT_ROWS`), the format probe clusters of rows that lie together in their source files (at most
`FORMAT_ROWS`: a D3 Parquet row group is then read once, not once per image). Their cost is bounded
whatever the store's size: a top-N scan (a few columns of every row, in DuckDB), then the vectors or
files of the sample only. Results are kept under `STORE/cache/probes/`, named by what they
read (the rows' content fingerprint, the model, the seed), so the rows of a table on the same data
compute each probe once. The results are plain JSON: a run stores them as `RunMetrics.checks`.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.evaluation.bootstrap import bootstrap_replicates, split_rng
from pipeline.evaluation.results import estimate_json
from pipeline.features.view import FeatureTable
from pipeline.sources.locations import Location, LocationReader
from pipeline.sources.reading import Expected
from pipeline.store import cache, catalog, duck
from pipeline.store.atomic import write_text
from pipeline.store.layout import Store
from trainer.metrics import Estimate, evaluate, roc_auc

PROBE_VERSION = 2  # a change to what a probe computes: cached results under another name
TEXT_ROWS = 20_000  # per split: the text probe's sample (D3: about 4,000 groups of 5)
FORMAT_ROWS = 2_000  # per split: the format probe reads these files' bytes
SHRINKAGE = 0.1  # λ = SHRINKAGE × the mean eigenvalue of S_w: keeps the solve stable when d nears the rows
SAMPLE_MEMORY = "256MB"  # the top-N scan of the view


def checks(store: Store, table: FeatureTable, features: str, seed: int, input_norm: str) -> dict[str, Any]:
    """The probes that concern a run with these `features`: text when it reads text, format when it
    reads images. Each a JSON dict (`{"ran": False, "why": …}` when it could not run)."""
    out: dict[str, Any] = {}
    if features != "image":
        key = ["text", table.model_key, table.data_fingerprint("text"), seed, input_norm, TEXT_ROWS]
        out["text"] = _cached(store, key, lambda: text_probe(store, table, seed, input_norm))
    if features != "text":
        key = ["format", table.data_fingerprint("image"), seed, FORMAT_ROWS]
        out["format"] = _cached(store, key, lambda: format_probe(store, table, seed))
    return out


# --- text ----------------------------------------------------------------------------------------------


def text_probe(store: Store, table: FeatureTable, seed: int, input_norm: str = "l2",
               limit: int = TEXT_ROWS) -> dict[str, Any]:
    """Test AUC of a linear discriminant on the text vectors alone (see the module's docstring)."""
    if table.texts is None:
        return {"ran": False, "why": "the store holds no text vectors for this model"}
    picks = {split: _sample(store, table, split, limit, with_text=True) for split in ("train", "test")}
    labels = {split: rows.column("label").to_numpy().astype(np.int8) for split, rows in picks.items()}
    if any(len(np.unique(y)) < 2 for y in labels.values()):
        return {"ran": False, "why": "train or test lacks one class among the rows with a text vector"}
    raw = input_norm == "raw"
    w = _discriminant(table.texts.gather(picks["train"].column("text_row").to_numpy(), raw), labels["train"])
    scores = table.texts.gather(picks["test"].column("text_row").to_numpy(), raw).astype(np.float64) @ w
    groups = _codes(picks["test"])
    auc = _auc(labels["test"], scores, groups, seed)
    both = [_mixed(picks[split]) for split in ("train", "test")]
    return {"ran": True, "method": "linear discriminant on the text vectors (fitted on train, scored on test)",
            "auc": estimate_json(auc), "train_rows": picks["train"].num_rows, "test_rows": picks["test"].num_rows,
            "test_groups": int(groups.max()) + 1, "sampled": limit,
            "mixed_groups": sum(m for m, _ in both) / max(1, sum(g for _, g in both))}


def _discriminant(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Fisher's direction (S_w + λI)⁻¹ (μ₁ − μ₀), S_w the pooled within-class covariance (float64)."""
    x = np.asarray(x, np.float64)
    mean = [x[y == c].mean(axis=0) for c in (0, 1)]
    centred = x - np.where((y == 1)[:, None], mean[1], mean[0])
    within = centred.T @ centred / len(x)
    del centred
    within[np.diag_indices_from(within)] += SHRINKAGE * np.trace(within) / len(within) + 1e-12
    return np.linalg.solve(within, mean[1] - mean[0])


def _mixed(rows: pa.Table) -> tuple[int, int]:
    """(groups holding both a real and a generated row, groups) among these rows."""
    codes = _codes(rows)
    label = rows.column("label").to_numpy()
    real = np.bincount(codes, weights=label == 0)
    fake = np.bincount(codes, weights=label == 1, minlength=len(real))
    return int(np.sum((real > 0) & (fake > 0))), len(real)


# --- format --------------------------------------------------------------------------------------------

CATEGORICAL: dict[str, Callable[[tuple[Any, ...]], Any]] = {
    "file format": lambda f: f[0],
    "JPEG quality": lambda f: f[1],
    "image size": lambda f: (f[2], f[3]),
    "format, quality and size together": lambda f: f[:4],
}
CONTINUOUS: dict[str, Callable[[tuple[Any, ...]], float]] = {
    "bytes per pixel": lambda f: f[4],
    "file size": lambda f: f[5],
}


def format_probe(store: Store, table: FeatureTable, seed: int, limit: int = FORMAT_ROWS) -> dict[str, Any]:
    """Test AUC of each container cue alone (see the module's docstring), from the bytes of a sample of
    the run's rows. Samples whose bytes cannot be read are counted, not guessed."""
    reader = LocationReader()
    found: dict[str, list[tuple[tuple[Any, ...], int, str]]] = {}
    unreadable = 0
    for split in ("train", "test"):
        found[split] = []
        for row in _files_sample(store, table, split, limit):  # (in location order: row groups read once)
            header = _header_features(reader, row)
            unreadable += header is None
            if header is not None:
                found[split].append((header, int(row["label"]), str(row["group_key"])))
    read = sum(len(v) for v in found.values())
    if any(len({label for _, label, _ in found[s]}) < 2 for s in found):
        return {"ran": False, "read": read, "unreadable": unreadable,
                "why": "the store holds no readable image bytes of both classes in train and test (imported "
                       f"features carry none; {unreadable} files unreadable)"}
    train, test = found["train"], found["test"]
    y_train = np.array([label for _, label, _ in train])
    y_test = np.array([label for _, label, _ in test])
    groups = np.unique(np.array([g for _, _, g in test]), return_inverse=True)[1].ravel()
    cues: dict[str, Any] = {}
    for name, cue in CATEGORICAL.items():
        scores = _lookup([cue(f) for f, _, _ in train], y_train, [cue(f) for f, _, _ in test])
        cues[name] = estimate_json(_auc(y_test, scores, groups, seed))
    for name, value in CONTINUOUS.items():
        fitted = np.array([value(f) for f, _, _ in train], np.float64)
        direction = 1.0 if not roc_auc(y_train, fitted) < 0.5 else -1.0
        scores = direction * np.array([value(f) for f, _, _ in test], np.float64)
        cues[name] = estimate_json(_auc(y_test, scores, groups, seed))
    return {"ran": True, "read": read, "unreadable": unreadable, "train_rows": len(train), "test_rows": len(test),
            "test_groups": int(groups.max()) + 1, "sampled": limit, "cues": cues}


BUCKET_ROWS = 64  # consecutive rows of a source file the format probe takes together


def _files_sample(store: Store, table: FeatureTable, split: str, limit: int) -> list[dict[str, Any]]:
    """At most `limit` samples of a split that the run reads and whose bytes the store can reach, taken in
    clusters: source files (their base names) and runs of `BUCKET_ROWS` rows inside one, in the order of
    their MD5. A Parquet source (D3) is read a row group at a time, so a run of consecutive rows costs one
    read per image column where the same number of scattered rows would cost one each; separate files and
    tar members cost one small read apiece either way. Which samples: a function of file names and row
    numbers, the same wherever the data is stored. Rows come back sorted by location."""
    which = "derived_from IS NULL" if table.perturbation is None else "perturbation = $perturbation"
    bucket = ("md5_number(regexp_extract(source_uri, '[^/]*$') || ':' || coalesce(source_member, '') || ':' "
              f"|| coalesce((source_row // {BUCKET_ROWS})::VARCHAR, ''))")
    located = ("sample_id, label, coalesce(group_key, sample_id) AS group_key, source_uri, source_member, "
               "source_row, byte_offset, byte_length")
    # the first 4 × limit candidates by cluster, then those the view holds (a sample without an image vector is
    # not the run's): a semi-join whose build side is the candidates, never the view's millions of ids
    sql = (f"WITH s AS (SELECT DISTINCT ON (sample_id) {located} FROM samples WHERE split = $split AND {which} "
           "AND source_format NOT LIKE 'features:%'), "
           f"c AS (SELECT *, {bucket} AS bucket FROM s ORDER BY bucket, sample_id LIMIT $wanted) "
           f"SELECT * EXCLUDE (bucket) FROM c WHERE sample_id IN (SELECT sample_id FROM {table.parts_sql} "
           "WHERE split = $split) ORDER BY bucket, sample_id LIMIT $limit")
    params: dict[str, object] = {"split": split, "limit": limit, "wanted": 4 * limit}
    if table.perturbation is not None:
        params["perturbation"] = table.perturbation
    with catalog.connect(store) as con:
        duck.limit_memory(con, SAMPLE_MEMORY, store.root / "cache" / "duckdb-tmp")
        rows = con.sql(sql, params=params).to_arrow_table().to_pylist()
    return sorted(rows, key=lambda r: (r["source_uri"], r["source_member"] or "", r["source_row"] or 0,
                                       r["byte_offset"] or 0))


def _lookup(train: list[Any], labels: np.ndarray, test: list[Any]) -> np.ndarray:
    """Each test value's rate of generated images among train samples with the same value (smoothed
    towards the prior; the prior for a value train never saw)."""
    table: dict[Any, list[int]] = {}
    for value, label in zip(train, labels, strict=True):
        table.setdefault(value, [0, 0])[int(label)] += 1
    prior = float(np.mean(labels))
    return np.array([(c[1] + prior) / (c[0] + c[1] + 1) if (c := table.get(value)) else prior for value in test])


def _header_features(reader: LocationReader, row: dict[str, Any]) -> tuple[Any, ...] | None:
    """(format, JPEG quality estimate, width, height, bytes per pixel, bytes) of one sample's file."""
    try:
        data = reader.read(Location.from_row(row), Expected.of(row, digest=False))  # bounded; the size checked
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            return (img.format, _jpeg_quality(img), width, height, len(data) / max(1, width * height),
                    float(len(data)))
    except Exception:  # noqa: BLE001 - any unreadable file is counted as such, whatever the reason
        return None


def _jpeg_quality(img: Image.Image) -> int | None:
    """libjpeg's quality from the first quantisation table (standard tables scaled); None if not JPEG."""
    tables = getattr(img, "quantization", None)
    if not tables:
        return None
    luma = np.asarray(tables[0], dtype=np.float64)
    scale = 100.0 * luma.mean() / _STD_LUMA_MEAN
    quality = (200 - scale) / 2 if scale <= 100 else 5000 / scale
    return int(np.clip(round(quality), 1, 100))


_STD_LUMA_MEAN = 57.625  # mean of the JPEG standard luminance table (Annex K), quality 50


# --- shared --------------------------------------------------------------------------------------------


def _sample(store: Store, table: FeatureTable, split: str, limit: int, with_text: bool) -> pa.Table:
    """A split's first `limit` rows of the view by the MD5 of their group key (whole groups, the same
    rows for the same data wherever it is stored), in that order."""
    where = "split = $split" + (" AND text_row IS NOT NULL" if with_text else "")
    sql = (f"SELECT sample_id, label, coalesce(group_key, sample_id) AS group_key, text_row "
           f"FROM {table.parts_sql} WHERE {where} "
           "ORDER BY md5_number(coalesce(group_key, sample_id)), sample_id LIMIT $limit")
    with duckdb.connect() as con:
        duck.limit_memory(con, SAMPLE_MEMORY, store.root / "cache" / "duckdb-tmp")
        return con.sql(sql, params={"split": split, "limit": limit}).to_arrow_table()


def _codes(rows: pa.Table) -> np.ndarray:
    return np.unique(np.asarray(rows.column("group_key").to_pylist(), dtype=str), return_inverse=True)[1].ravel()


def _auc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray, seed: int) -> Estimate:
    """AUC with the run's interval policy: groups resampled, drawn by `split_rng(seed, "test")`."""
    return evaluate(labels, scores, groups, rng=split_rng(seed, "test"),
                    n_boot=bootstrap_replicates(len(labels)))["auc"]


def _cached(store: Store, key: list[Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A probe's result, computed once for what it reads (its `key`) and kept as a small JSON file.
    Written atomically under the cache's build lock; never swept (about a kilobyte per data version)."""
    directory = store.root / "cache" / "probes"
    name = hashlib.sha256(json.dumps([PROBE_VERSION, *key], default=str).encode()).hexdigest()[:24]
    path = directory / f"{name}.json"
    found = cache.read_json(path)
    if found is not None:
        return found
    result = compute()
    with cache.building(directory):
        write_text(path, json.dumps(result))
    return result

