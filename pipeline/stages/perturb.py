"""`pipeline perturb`: derive new samples from existing ones by JPEG, resize, blur, crop or noise.

A derived sample is an ordinary sample with its own `sample_id` (the SHA-256 of its new bytes),
`derived_from` (the source sample) and `perturbation` (e.g. `jpeg:75`); it keeps the source's label,
generator, group, split and text, so real and generated images are treated alike and `encode`
encodes only the new images (their texts are already encoded). The bytes live in
STORE/derived/<perturbation>/, written atomically. Operations are deterministic: a rerun adds nothing.
The training view leaves derived samples out; `experiment robustness` reads them one perturbation
at a time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import Validated, at_least, read_toml
from pipeline.errors import PipelineError
from pipeline.reporting import Reporter, Silent
from pipeline.sources.images import UndecodableImage, decode_rgb
from pipeline.sources.locations import Location, LocationReader
from pipeline.sources.perturbations import Perturbation, parse_ops
from pipeline.store import catalog, duck, writes
from pipeline.store.atomic import write_bytes, write_parquet
from pipeline.store.keys import KeyQuery, StoreKeys, first_occurrence, keys_of
from pipeline.store.layout import Store, safe_name
from pipeline.store.writes import writing
from schemas import SAMPLES, SPLITS, from_rows

FLUSH_ROWS = 2000  # derived sample rows per samples shard
BATCH_ROWS = 1024  # source rows looked up at a time


@dataclass(frozen=True)
class PerturbConfig(Validated):
    store: Store
    ops: tuple[str, ...]  # e.g. ("jpeg:90,75,50", "resize:0.5")
    splits: tuple[str, ...] = ("test",)  # every split: train and test then share one format
    limit: int | None = None  # at most this many source samples per split (a fixed hash order)
    wait: bool = True

    def check(self) -> None:
        unknown = sorted(set(self.splits) - set(SPLITS))
        if unknown or not self.splits:
            raise PipelineError(f"--splits takes {', '.join(SPLITS)}, not {', '.join(unknown) or 'nothing'}.")
        at_least(self, "limit", 1)
        parse_ops(self.ops)

    @staticmethod
    def ops_from_toml(path: Path) -> tuple[str, ...]:
        """A TOML file `[ops]` table: jpeg = [90, 75], blur = [1, 2] → ("jpeg:90,75", "blur:1,2")."""
        data = read_toml(path, "operations file")
        ops = data.get("ops", data)
        if not isinstance(ops, dict):
            raise PipelineError(f"{path} must hold an [ops] table such as jpeg = [90, 75].")
        values = {op: v if isinstance(v, list) else [v] for op, v in ops.items()}
        return tuple(f"{op}:{','.join(str(x) for x in v)}" for op, v in values.items())


@dataclass
class PerturbResult:
    derived: int = 0  # new samples written
    existing: int = 0  # (source, operation) pairs already derived earlier
    undecodable: int = 0  # sources whose bytes could not be read or decoded
    by_op: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def run(config: PerturbConfig, reporter: Reporter | None = None) -> PerturbResult:
    """Derive each source sample's missing perturbations, streaming the sources in location order.

    Memory does not grow with the store: the sources come from DuckDB in batches (sorted within
    `DUCKDB_MEMORY`, spilling beyond), and "already derived" and "already a sample" are lookups in
    the store's key sets (`pipeline.store.keys`), kept up to date with every shard committed."""
    reporter = reporter or Silent()
    store = config.store
    if not store.exists():
        raise PipelineError(f"No store at {store.root}: run `pipeline ingest` first.")
    perturbations = parse_ops(config.ops)
    started = time.perf_counter()
    result = PerturbResult(by_op={p.name: 0 for p in perturbations})
    queries = {"samples": KeyQuery("samples", "sample_id"),
               "derived": KeyQuery("samples", _PAIR, "derived_from IS NOT NULL")}
    with writing(store, reporter, config.wait), StoreKeys(store, queries, maintained=queries) as keys, \
            _sources(store, config) as (total, batches):
        reader = LocationReader()
        now = datetime.now(UTC)
        pending: list[dict[str, Any]] = []
        reporter.start("perturb", total, "images")
        for batch in batches:
            ids = batch.column("sample_id")
            done = {p.name: keys.get("derived").contains(_pair_keys(ids, p.name)) for p in perturbations}
            derived: list[dict[str, Any]] = []
            for i, row in enumerate(batch.to_pylist()):
                todo = [p for p in perturbations if not done[p.name][i]]
                result.existing += len(perturbations) - len(todo)
                if todo:
                    try:
                        image = decode_rgb(reader.read(Location.from_row(row)))
                    except (UndecodableImage, OSError):
                        result.undecodable += 1
                        todo = []
                derived += [_derive(store, row, p, image, now) for p in todo]
                reporter.advance("perturb", 1)
            if not derived:
                continue
            new_ids = pa.array([d["sample_id"] for d in derived], pa.string())
            id_keys = keys_of(new_ids)
            # the same bytes from another source (or twice in this batch) make one sample
            new = ~keys.get("samples").contains(id_keys) & first_occurrence(id_keys)
            kept = [d for d, keep in zip(derived, new, strict=True) if keep]
            for d in kept:
                result.by_op[d["perturbation"]] += 1
            if not kept:
                continue
            keys.add("samples", id_keys[new])
            pairs = {c: pa.array([d[c] for d in kept], pa.string()) for c in ("derived_from", "perturbation")}
            keys.add("derived", keys_of(pa.table(pairs), _PAIR))
            pending += kept
            if len(pending) >= FLUSH_ROWS:
                result.derived += _flush(store, pending)
        result.derived += _flush(store, pending)
    result.seconds = time.perf_counter() - started
    return result


_PAIR = "concat_ws(chr(0), derived_from, perturbation)"  # a (source, operation) pair derived already
_ORDER = ("source_uri, source_member NULLS FIRST, source_row NULLS FIRST, byte_offset NULLS FIRST, sample_id")
DUCKDB_MEMORY = "512MB"


def _pair_keys(ids: pa.Array | pa.ChunkedArray, name: str) -> np.ndarray:
    return keys_of(pa.table({"derived_from": ids, "perturbation": pa.array([name] * len(ids), pa.string())}), _PAIR)


@contextmanager
def _sources(store: Store, config: PerturbConfig) -> Iterator[tuple[int, Iterator[pa.RecordBatch]]]:
    """Original samples of the splits (at most `limit` per split, in a fixed hash order), as their
    count and batches in location order (Parquet row groups and tars are read once)."""
    placeholders = ", ".join("?" for _ in config.splits)
    chosen = f"SELECT * FROM samples WHERE derived_from IS NULL AND split IN ({placeholders})"
    if config.limit:
        chosen = (f"SELECT * EXCLUDE (_n) FROM (SELECT *, row_number() OVER (PARTITION BY split ORDER BY "
                  f"hash(sample_id), sample_id) AS _n FROM ({chosen})) WHERE _n <= {int(config.limit)}")
    spill = store.root / "cache" / f"perturb-tmp-{os.getpid()}"
    try:
        with catalog.connect(store) as con:
            duck.limit_memory(con, DUCKDB_MEMORY, spill)
            splits = list(config.splits)
            total = con.execute(f"SELECT count(*) FROM ({chosen})", splits).fetchall()[0][0]
            if not total and not con.execute(f"SELECT 1 FROM samples WHERE split IN ({placeholders}) LIMIT 1",
                                             splits).fetchall():
                raise PipelineError(f"The store has no samples in {', '.join(config.splits)}.")
            yield total, iter(con.sql(f"{chosen} ORDER BY {_ORDER}", params=splits).to_arrow_reader(BATCH_ROWS))
    finally:
        shutil.rmtree(spill, ignore_errors=True)


def _derive(store: Store, row: dict[str, Any], p: Perturbation, image: Any, now: datetime) -> dict[str, Any]:
    data = p.apply(image, row["sample_id"].encode())
    sample_id = hashlib.sha256(data).hexdigest()
    path = store.root / "derived" / safe_name(p.name) / sample_id[:2] / f"{sample_id}.{p.suffix}"
    if not path.exists():
        write_bytes(path, data)
    derived = {name: row.get(name) for name in SAMPLES.names}
    derived.update({
        "sample_id": sample_id, "derived_from": row["sample_id"], "perturbation": p.name,
        "source_format": "derived", "source_uri": str(path.resolve()), "source_member": None,
        "source_row": None, "byte_offset": None, "byte_length": len(data), "ingested_at": now,
    })
    return derived


def _flush(store: Store, pending: list[dict[str, Any]]) -> int:
    if not pending:
        return 0
    shard = write_parquet(from_rows(SAMPLES, pending), store.new_shard(store.dataset_dir("samples"), "derived"))
    writes.commit(store, [shard])
    n = len(pending)
    pending.clear()
    return n
