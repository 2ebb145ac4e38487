"""A run in the store: its definition (`TrainConfig`), its record on disk, and how to load it back.

A run is its config (and hash, which includes the fingerprint of the data it saw), its metrics,
the weights of its best validation epoch (safetensors) and one score per sample. `write_run` is the
one writer of all of it; `load_run` / `load_run_record` read it back for scoring, reports and
landscapes. Stages that make runs (`train`, `sweep`, `experiment`) and stages that read them
(`score`, `report`, `landscape`) meet here instead of importing each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from pipeline.config import Validated, at_least, within
from pipeline.errors import PipelineError
from pipeline.features.loader import FeatureLoader, LoaderConfig
from pipeline.features.view import FeatureTable
from pipeline.store import catalog
from pipeline.store.atomic import PARQUET_COMPRESSION, atomic_write, temp_path, write_parquet, write_text
from pipeline.store.layout import Store
from schemas import METRICS, RUNS, SCORES, SPLITS, from_columns, from_rows
from trainer.fit import ARITHMETIC, FitConfig, build_model
from trainer.precision import PRECISIONS

EVAL_ROWS = 2048  # the fixed evaluation set: the first rows of the val split in table order
SCORE_GROUP_ROWS = 131_072  # rows per row group of a score shard (batches are buffered up to this)
DUCKDB_MEMORY = "1GB"  # queries over every score of a run (group codes, unscored rows) spill beyond this


@dataclass(frozen=True)
class TrainConfig(Validated):
    """Everything that defines a run. `name` is a label only; every other field enters the hash."""

    model_key: str | None = None
    features: Literal["image", "text", "image+text"] = "image+text"
    pairing: Literal["as-ingested", "shared"] = "as-ingested"
    batch_size: int = 2048
    shuffle_buffer: int = 65536
    seed: int = 0
    detector: Literal["mlp", "knn"] = "mlp"  # mlp: the paper's detector | knn: vote of the nearest training samples
    exclude_leaks: bool = False  # drop val/test samples with a near-duplicate in an earlier split
    leak_threshold: float = 0.95  # cosine similarity that counts as a near-duplicate
    # l2: the unit vectors as stored | raw: each scaled back by its stored norm (the reference code's inputs)
    input_norm: Literal["l2", "raw"] = "l2"
    steps_per_epoch: int | None = None  # stop each epoch after this many batches (None: the whole split)
    # fit (and pick the epoch) on the real images and these generators' only; score every sample
    train_generators: tuple[str, ...] | None = None
    # train, pick and score on the samples `pipeline perturb` derived by this operation (e.g. jpeg:95 applied
    # to every split, so that train and test share one format) instead of the samples as ingested
    perturbation: str | None = None
    fit: FitConfig = field(default_factory=FitConfig)
    name: str | None = None
    # torch threads (None: `trainer.threads.choose_threads` decides). Not in the hash as asked: the
    # count used enters it where the numbers depend on it (bf16 on the CPU), see `config_hash`
    threads: int | None = None

    def check(self) -> None:
        within(self, "leak_threshold", 0, 1, low_open=True)
        if self.batch_size < 2:
            raise PipelineError("--batch-size must be at least 2 (BatchNorm needs two samples).")
        at_least(self, "shuffle_buffer", 1)
        at_least(self, "steps_per_epoch", 1)
        at_least(self, "threads", 1)
        fit = self.fit
        if fit.precision not in PRECISIONS:
            raise PipelineError(f"--precision must be one of {', '.join(PRECISIONS)}, not {fit.precision!r}.")
        at_least(fit, "epochs", 1)
        within(fit, "cvar_alpha", 0, 1, low_open=True)
        within(fit, "auc_gamma", 0, 1)
        within(fit, "auc_eta", 0, 1, low_open=True)
        if fit.auc_p <= 1:
            raise PipelineError(f"--auc-p must be above 1, not {fit.auc_p}.")
        if fit.lr <= 0:
            raise PipelineError(f"--lr must be above 0, not {fit.lr}.")
        at_least(fit, "weight_decay", 0)
        at_least(fit, "sam_rho", 0)
        within(fit, "dropout", 0, 1, high_open=True)
        at_least(fit, "depth", 0)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> TrainConfig:
        """Flat keys (as in TOML): TrainConfig fields and FitConfig fields side by side. The former
        `bf16 = true/false` reads as `precision = "bf16"/"fp32"`."""
        if "bf16" in data and "precision" not in data:
            data = {**{k: v for k, v in data.items() if k != "bf16"},
                    "precision": "bf16" if data["bf16"] else "fp32"}
        own = {f.name for f in dataclasses.fields(TrainConfig)} - {"fit"}
        fit_fields = {f.name for f in dataclasses.fields(FitConfig)}
        unknown = sorted(set(data) - own - fit_fields)
        if unknown:
            raise PipelineError(f"Unknown training option(s): {', '.join(unknown)}.")
        fit_kwargs: dict[str, Any] = {
            k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in fit_fields
        }
        _check_types(data)
        own_kwargs: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in own}
        return TrainConfig(fit=FitConfig(**fit_kwargs), **own_kwargs)

    @staticmethod
    def from_toml(path: Path) -> TrainConfig:
        try:
            return TrainConfig.from_dict(tomllib.loads(path.read_text()))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise PipelineError(f"Cannot read {path}: {exc}") from exc

    def flat(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "fit"}
        out.update(dataclasses.asdict(self.fit))
        return out


def config_hash(config: TrainConfig, model_key: str, table: FeatureTable, leak_scan: str | None = None,
                threads: int | None = None) -> str:
    """What determines a run's numbers: its config (precision as resolved, not `auto`), the trainer's
    arithmetic version, the model and data fingerprint, and `threads` where the numbers depend on
    the thread count (bf16 products on the CPU; none otherwise)."""
    flat = config.flat()
    flat.pop("name")
    flat.pop("threads")
    flat["arithmetic"] = ARITHMETIC
    if threads is not None:
        flat["threads"] = threads
    for optional in ("train_generators", "perturbation"):  # absent: runs made before the option keep their hash
        if flat.get(optional) is None:
            flat.pop(optional, None)
    if flat.get("input_norm") == "l2":  # the default: runs made before the option keep their hash
        flat.pop("input_norm", None)
    if flat.get("steps_per_epoch") is None:
        flat.pop("steps_per_epoch", None)
    flat["model_key"] = model_key
    flat["data"] = table.fingerprint
    if leak_scan:
        flat["leak_scan"] = leak_scan
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()


def existing_run(store: Store, chash: str) -> str | None:
    if not catalog.shard_paths(store, "runs"):
        return None
    rows = catalog.query(store, "SELECT run_id FROM runs WHERE config_hash = ? ORDER BY created_at", [chash])
    return rows.column(0)[0].as_py() if rows.num_rows else None


def load_run(store: Store, run_id: str) -> tuple[TrainConfig, torch.nn.Module, dict[str, Any]]:
    """A trained detector back from its run directory: config, model (eval mode), metrics."""
    config, metrics = load_run_record(store, run_id)
    run_dir = store.run_dir(run_id)
    if config.detector != "mlp":
        raise PipelineError(f"Run {run_id} is a {config.detector} detector; it keeps no weights to load.")
    state = load_file(str(run_dir / "model.safetensors"))
    in_dim = state["body.0.weight"].shape[1] if "body.0.weight" in state else state["head.weight"].shape[1]
    model = build_model(in_dim, config.fit)
    model.load_state_dict(state)
    model.eval()
    return config, model, metrics


def load_run_record(store: Store, run_id: str) -> tuple[TrainConfig, dict[str, Any]]:
    """A run's config and metrics (any detector)."""
    run_dir = store.run_dir(run_id)
    if not (run_dir / "run.parquet").exists():
        raise PipelineError(
            f"No run {run_id!r} in {store.root}; `pipeline sql \"SELECT run_id FROM runs\"` lists them."
        )
    flat = json.loads((run_dir / "config.json").read_text())
    return TrainConfig.from_dict(flat), json.loads((run_dir / "metrics.json").read_text())


def evaluation_set(table: FeatureTable, features: str,
                   input_norm: str = "l2") -> tuple[torch.Tensor, torch.Tensor, str]:
    """The fixed set a run's evaluation loss (and its loss landscape) is computed on.

    The first `EVAL_ROWS` rows of the val split in the feature table's fixed order (the test split
    when val is empty).
    """
    for split in ("val", "test"):
        xs, ys, n = [], [], 0
        for b in FeatureLoader(table, (split,), LoaderConfig(features, 4096, input_norm=input_norm)).epoch(0):
            xs.append(b.x[: EVAL_ROWS - n])
            ys.append(b.y[: EVAL_ROWS - n])
            n += len(xs[-1])
            if n >= EVAL_ROWS:
                break
        if n:
            return torch.cat(xs), torch.cat(ys), split
    raise PipelineError("The store has no val or test samples to evaluate on.")


@torch.no_grad()
def evaluation_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, fit_config: FitConfig) -> float:
    """The run's objective (as configured) on one evaluation set, weights in eval mode."""
    model.eval()
    return float(fit_config.loss(model(x).float(), y))


# --- private -------------------------------------------------------------------------------


class _ParquetStream:
    """Rows of `schema` streamed into a hidden temp file beside `path`, named for this process: a
    concurrent writer's sweep leaves it alone, the next writer after a kill removes it. Batches are
    copied and buffered into row groups of `GROUP_ROWS`, so memory is one row group whatever the size."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.schema, self.tmp = path, schema, temp_path(path)
        self.rows = 0
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(
            self.tmp, schema, compression=PARQUET_COMPRESSION, write_page_checksum=True)
        self._pending: list[pa.Table] = []
        self._kept = False  # the temp file was moved into place

    def append(self, columns: dict[str, pa.Array | pa.ChunkedArray | np.ndarray]) -> None:
        # copied: a batch is often a slice of a larger read (whose buffers a kept slice keeps whole),
        # and numpy scores kept from batch to batch would pin the C heap between larger buffers
        copied = {k: pa.concat_arrays(v.chunks if isinstance(v, pa.ChunkedArray)
                                      else [v if isinstance(v, pa.Array) else pa.array(v)])
                  for k, v in columns.items()}
        table = from_columns(self.schema, copied)
        self._pending.append(table)
        self.rows += table.num_rows
        if sum(t.num_rows for t in self._pending) >= SCORE_GROUP_ROWS:
            self._flush()

    def close(self) -> Path:
        """Finish the temp file (no more rows); returns its path."""
        if self._writer is not None:
            self._flush()
            self._writer.close()
            self._writer = None
        return self.tmp

    def discard(self) -> None:
        """Drop the temp file unless it was moved into place (a no-op then)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if not self._kept:
            self.tmp.unlink(missing_ok=True)

    def _flush(self) -> None:
        if self._pending and self._writer is not None:
            self._writer.write_table(pa.concat_tables(self._pending))
        self._pending = []


class ScoreWriter(_ParquetStream):
    """The one writer of score shards: scores/<run_id>[-<part>].parquet, streamed batch by batch to a
    temp file (see `_ParquetStream`); `publish` moves it into place for the caller to commit under the
    writer lock."""

    def __init__(self, store: Store, run_id: str, part: str | None = None) -> None:
        self.run_id = run_id
        super().__init__(store.dataset_dir("scores") / (f"{run_id}-{part}.parquet" if part else f"{run_id}.parquet"),
                         SCORES)

    def write(self, rows: pa.Table, scores: np.ndarray) -> None:
        """The scores of these rows (columns sample_id, split, label, generator; any others ignored)."""
        if rows.num_rows:
            self.append({"run_id": pa.array([self.run_id] * rows.num_rows, pa.string()),
                         **{c: rows.column(c) for c in ("sample_id", "split", "label", "generator")},
                         "score": np.asarray(scores, np.float32)})

    def publish(self) -> Path:
        """Move the finished file into place; returns the shard's path, for `catalog.commit`."""
        tmp = self.close()
        atomic_write(self.path, lambda target: os.replace(tmp, target))
        self._kept = True
        return self.path


class GroupKeys(_ParquetStream):
    """Takes the batches a `ScoreWriter` takes and keeps each row's group key, in a temp file beside
    the scores, for `codes`: the key (its own sample id when it has none) comes with the view's rows,
    so ranking the keys is one external sort, no join with the samples table. Rows without a
    `group_key` column (kNN's) keep their sample id, looked up in `samples` when ranked."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.store = store
        self.lookup = False
        super().__init__(store.dataset_dir("scores") / f"{run_id}-groups.parquet", _KEYS)

    def write(self, rows: pa.Table, scores: np.ndarray) -> None:
        if not rows.num_rows:
            return
        if "group_key" in rows.column_names:
            self.append({"key": pc.coalesce(rows.column("group_key"), rows.column("sample_id"))})
        else:
            self.lookup = True
            self.append({"key": rows.column("sample_id")})

    def codes(self) -> np.ndarray:
        """`group_codes` of the rows written, in order; the temp file is gone afterwards."""
        try:
            keys = f"read_parquet('{_sql_str(str(self.close()))}', file_row_number = true)"
            if self.lookup:
                return _ranked(self.store, self.rows, f"SELECT f.file_row_number AS i, coalesce(k.group_key, f.key) "
                               f"AS key FROM {keys} f LEFT JOIN samples k ON k.sample_id = f.key")
            return _ranked(self.store, self.rows, f"SELECT file_row_number AS i, key FROM {keys}")
        finally:
            self.discard()


_KEYS = pa.schema([pa.field("key", pa.string(), nullable=False)])


@dataclass
class ScoreArrays:
    """Scores as numbers only, about ten bytes a sample: what metrics need, with no id or name per row."""

    label: np.ndarray  # int8: 1 generated
    score: np.ndarray  # float32: the probability of "generated"
    split: np.ndarray  # int8: index into SPLITS
    generator: np.ndarray  # int16: index into `generators`
    generators: tuple[str, ...]  # sorted
    excluded: np.ndarray  # bool: a leaking sample, left out of metrics
    group: np.ndarray | None = None  # int32: the rank of the sample's group key among all keys (`group_codes`)

    def of(self, split: str) -> np.ndarray:
        """The mask of this split's rows that count (leaking ones excluded)."""
        return (self.split == SPLITS.index(split)) & ~self.excluded


class ScoreCollector:
    """Takes the same batches as `ScoreWriter` and keeps only `ScoreArrays`' numbers of them.

    Leaking ids are looked up in an Arrow hash set and generator names become small codes: no Python
    object per row. The numbers go into arrays allocated for `capacity` rows up front (grown by
    doubling if more come): small arrays kept batch after batch pin the allocator's heap between
    the batches' large transient buffers (measured: about 2 KB a sample of resident memory, for
    the 9 bytes kept).
    """

    def __init__(self, capacity: int, excluded: set[str] | None = None) -> None:
        self._excluded = pa.array(sorted(excluded or ()), pa.string())
        self._names: list[str] = []
        self._arrays: dict[str, np.ndarray] = {k: np.zeros(max(capacity, 1), t) for k, t in _COLLECTED.items()}
        self.rows = 0

    def write(self, rows: pa.Table, scores: np.ndarray) -> None:
        n, at = rows.num_rows, self.rows
        if at + n > len(self._arrays["label"]):
            size = max(at + n, 2 * len(self._arrays["label"]))
            self._arrays = {k: np.concatenate([v[:at], np.zeros(size - at, v.dtype)]) for k, v in self._arrays.items()}
        generator = rows.column("generator")
        self._names += sorted(set(pc.unique(generator).to_pylist()) - set(self._names))
        columns = {
            "label": rows.column("label"),
            "score": scores,
            "split": pc.index_in(rows.column("split"), value_set=pa.array(SPLITS)),
            "generator": pc.index_in(generator, value_set=pa.array(self._names, pa.string())),
            "excluded": pc.is_in(rows.column("sample_id"), value_set=self._excluded),
        }
        for name, column in columns.items():
            values = column if isinstance(column, np.ndarray) else column.to_numpy(zero_copy_only=False)
            self._arrays[name][at:at + n] = values
        self.rows += n

    def arrays(self) -> ScoreArrays:
        """Everything written so far, generator codes renumbered in name order."""
        names = sorted(self._names)
        renumber = np.array([names.index(n) for n in self._names] or [0], np.int16)
        a = {name: v[:self.rows] for name, v in self._arrays.items()}
        return ScoreArrays(a["label"], a["score"], a["split"], renumber[a["generator"]], tuple(names), a["excluded"])


_COLLECTED = {"label": np.int8, "score": np.float32, "split": np.int8, "generator": np.int16, "excluded": np.bool_}


def group_codes(store: Store, ids: pa.Array | np.ndarray) -> np.ndarray:
    """Each sample's group as an int32 code, in order: the rank of its `group_key` among the keys of
    all of them (its own sample id when the samples table has none for it), so codes sort as the
    keys do and a metric's group bootstrap draws what it drew from the keys themselves. (A run's
    scores get theirs from `GroupKeys`, without the join.)"""
    column = ids if isinstance(ids, pa.Array | pa.ChunkedArray) else pa.array(ids, pa.string())
    return _ranked(store, len(column), "SELECT ids.i, coalesce(k.group_key, ids.sample_id) AS key FROM ids "
                   "LEFT JOIN samples k USING (sample_id)",
                   {"ids": pa.table({"sample_id": column.cast(pa.string()), "i": np.arange(len(column))})})


def _ranked(store: Store, n: int, rows_sql: str, tables: dict[str, pa.Table] | None = None) -> np.ndarray:
    """Dense ranks (0-based, int32) of `key` for rows `i` < n of a query with columns (i, key).

    DuckDB sorts by key within `DUCKDB_MEMORY` (an external sort: it spills, measured flat to 6M keys
    in 128 MB where a window or a join grew with rows); ranks are counted as the sorted keys stream
    back, a batch at a time with Arrow compute: no key becomes a Python object."""
    out = np.zeros(n, np.int32)
    with catalog.connect(store) as con:
        bound_memory(con, store)
        for name, table in (tables or {}).items():
            con.register(name, table)
        rel = con.sql(f"SELECT i, key FROM ({rows_sql}) ORDER BY key, i")
        stream = getattr(rel, "to_arrow_reader", None) or rel.fetch_record_batch  # DuckDB 2 / 1
        rank, last, seen = -1, None, 0
        for batch in stream(1 << 16):
            m = batch.num_rows
            seen += m
            if not m:
                continue
            keys = batch.column(1)
            new = np.empty(m, bool)
            new[0] = last is None or keys[0].as_py() != last
            new[1:] = pc.not_equal(keys.slice(1), keys.slice(0, m - 1)).to_numpy(zero_copy_only=False)
            codes = rank + np.cumsum(new)
            out[batch.column(0).to_numpy()] = codes
            rank, last = int(codes[-1]), keys[m - 1].as_py()
    if seen < n:
        raise RuntimeError(f"group keys of {seen} of {n} rows")
    return out


def bound_memory(con: duckdb.DuckDBPyConnection, store: Store) -> None:
    """Hold a DuckDB connection's sorts, joins and aggregates to `DUCKDB_MEMORY`, spilling to the store's cache."""
    catalog.limit_memory(con, DUCKDB_MEMORY, store.root / "cache" / "duckdb-tmp")


def _sql_str(text: str) -> str:
    return text.replace("'", "''")


def write_run(store: Store, run_id: str, chash: str, config: TrainConfig, model_key: str,
               metrics: dict[str, Any], state: dict[str, torch.Tensor] | None, scores: ScoreWriter) -> None:
    """Write a run's files and commit them with its scores (written by `scores`, published here)."""
    run_dir = store.run_dir(run_id)
    flat = config.flat()
    flat["model_key"] = model_key
    write_text(run_dir / "config.json", json.dumps(flat, indent=2, default=str))
    write_text(run_dir / "metrics.json", json.dumps(jsonable(metrics), indent=2))
    checkpoint: Path | None = None
    if state is not None:
        checkpoint = run_dir / "model.safetensors"
        atomic_write(checkpoint, lambda tmp: save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                                                      metadata={"run_id": run_id, "config_hash": chash}))
    scores_path = scores.publish()
    run_row = from_rows(RUNS, [{
        "run_id": run_id, "name": config.name, "config_hash": chash, "model_key": model_key,
        "features": config.features, "val_auc": num(metrics["val"].get("auc")),
        "test_auc": num(metrics["test"].get("auc")), "config_json": json.dumps(flat, default=str),
        "metrics_json": json.dumps(jsonable(metrics)),
        "checkpoint": store.relative(checkpoint) if checkpoint else None,
        "created_at": datetime.now(UTC),
    }])
    metrics_path = write_parquet(from_rows(METRICS, metric_rows(run_id, metrics)),
                                 store.dataset_dir("metrics") / f"{run_id}.parquet")
    # The run row last, then one commit of all three: a run is visible only once every file is in
    # place. A kill before `run.parquet` leaves ghosts the next writer sweeps (scores and metrics
    # named by a run without `run.parquet`); a kill after it, files the next writer adopts whole.
    catalog.commit(store, [scores_path, metrics_path, write_parquet(run_row, run_dir / "run.parquet")])


def metric_rows(run_id: str, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The `metrics` table's rows of a run: every split x generator x metric with its interval and n."""
    rows = []
    for split in ("train", "val", "test"):
        summary = metrics.get(split) or {}
        for generator, by_metric in (summary.get("intervals") or {}).items():
            for metric, e in by_metric.items():
                rows.append({"run_id": run_id, "split": split, "generator": generator, "metric": metric,
                             "value": num(e["value"]), "lo": num(e["lo"]), "hi": num(e["hi"]), "n": e["n"]})
        chosen = summary.get("at_val_threshold") or {}
        for metric, e in (chosen.get("metrics") or {}).items():
            rows.append({"run_id": run_id, "split": split, "generator": "all", "metric": f"{metric}_at_val_threshold",
                         "value": num(e["value"]), "lo": num(e["lo"]), "hi": num(e["hi"]), "n": e["n"]})
    return rows


def _check_types(data: dict[str, Any]) -> None:
    """TOML values of the wrong type get a sentence, not a TypeError deep in the trainer."""
    defaults = {**TrainConfig().flat()}
    for key, value in data.items():
        default = defaults.get(key)
        if default is None or value is None:
            continue
        want: tuple[type, ...] = (int, float) if isinstance(default, float) else (type(default),)
        if isinstance(default, tuple):
            want = (list, tuple)
        if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, want):
            raise PipelineError(f"Training option {key} must be {type(default).__name__}, not {value!r}.")


def run_metrics(store: Store, run_id: str) -> dict[str, Any]:
    path = store.run_dir(run_id) / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def num(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else float(value)


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and np.isnan(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value
