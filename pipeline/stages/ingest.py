"""Stage `ingest`: turn a source (D3, folder, webdataset, manifest) into sample rows.

`sample_id` is the SHA-256 of the image bytes (hashed while streaming, never held whole), so
re-ingesting adds nothing. The split comes from hashing the group key, so related images (a real
photo and the images generated from its caption) always share one; `--splits source` keeps the
split the source declares instead. Inputs that cannot become samples are quarantined with a reason.
`--unlabelled` records images with no label (split `unlabelled`): never trained on, never in conflict.

The same bytes under another label never change the store's training data: the sample keeps the
label it was stored with (within one read, the first copy read), and the other claim is recorded in
quarantine (`label_conflict`, with the label it claimed), listed by the `conflicts` view and
reported in a sentence; only `pipeline conflicts resolve` changes a label (and can undo it). An
unlabelled sample brought again with a label becomes a labelled one (a `decisions` row says so).

Bookkeeping works in bounded chunks: each unit of the source (a file, or a manifest row) is checked
against the `sources` ledger and skipped when it was read before, unchanged and with the same
options; a file that only grew (a tar appended to, a CSV manifest with lines added) is read from
where its last read stopped, as its latest ledger row says, if the bytes before that are unchanged;
new rows are de-duplicated against the store's sample ids and quarantined inputs. Both are
lookups in key sets (`pipeline.store.keys`: sorted, memory-mapped, kept between runs), so neither
memory nor the cost of a chunk grows with the store; the store's rows are read only for the ids of a
chunk it already holds (to tell a duplicate from a label conflict).

D3's real-images folder is a ledger unit of its own, not an option: when it changed, only the rows
quarantined as `real_image_missing` are looked up in its new index (`_recheck_real_images`, the
quarantine streamed from one bounded DuckDB query); the Parquet files are not read again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import numpy as np
import pyarrow as pa

from pipeline.choices import GroupBy, SourceFormat
from pipeline.config import Validated, at_least
from pipeline.errors import PipelineError
from pipeline.reporting import Reporter, Silent
from pipeline.sources.common import (
    DEFAULT_MAX_BYTES,
    RESOLVED,
    Candidate,
    Items,
    Limits,
    Problem,
    Resolved,
    Resume,
    Returning,
    Unit,
    absolute,
)
from pipeline.sources.d3 import DEFAULT_GENERATORS, REAL_MISSING, D3Source
from pipeline.sources.folder import FolderSource
from pipeline.sources.generators import canonical
from pipeline.sources.ledger import (
    LABEL_NAMES,
    PROBLEM_KEY,
    assign_split,
    conflict_row,
    ledger_queries,
    ledger_row,
    resume_points,
    text_hash,
    unread,
    where,
)
from pipeline.sources.manifest import ManifestSource
from pipeline.sources.webdataset import WebdatasetSource
from pipeline.store import catalog, duck, writes
from pipeline.store.atomic import write_parquet
from pipeline.store.keys import KeyQuery, StoreKeys, first_occurrence, keys_of
from pipeline.store.layout import Store
from pipeline.store.writes import writing
from schemas import DECISIONS, QUARANTINE, SAMPLES, SOURCES, UNLABELLED, from_rows

FORMATS: tuple[str, ...] = get_args(SourceFormat)
_UNIT_CHUNK = 65_536  # units checked against the ledger at a time
_RECHECK_BATCH = 65_536  # quarantined rows looked up again at a time
_RECHECK_MEMORY = "512MB"  # DuckDB's budget for finding them (spills beyond)


@dataclass(frozen=True)
class IngestConfig(Validated):
    source: Path
    format: SourceFormat
    store: Store
    real_images: Path | None = None
    generator: str | None = None
    label_map: Path | None = None
    generators: tuple[str, ...] = DEFAULT_GENERATORS
    group_by: GroupBy = "stem"
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_seed: str = "0"
    splits_from: Literal["hash", "source"] = "hash"  # `--splits source`: keep the source's own splits
    max_bytes: int = DEFAULT_MAX_BYTES
    shard_rows: int = 50_000
    wait: bool = True  # wait for another writer of the store instead of stopping
    unlabelled: bool = False  # record every image with no label, split `unlabelled` (folder: any layout)

    def check(self) -> None:
        if not self.source.exists():
            raise PipelineError(f"Source {self.source} does not exist.")
        if self.unlabelled and self.format not in ("folder", "webdataset"):
            raise PipelineError(f"--unlabelled reads a folder (any layout) or webdataset tars, not a {self.format} "
                                "source, whose rows carry labels.")
        fractions = self.split_fractions
        if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
            raise PipelineError("--splits needs three non-negative fractions (train,val,test) summing to 1, "
                                "or the word source.")
        if len(self.generators) != 4:
            raise PipelineError(f"--generators needs 4 names (D3's gen_0..gen_3), not {len(self.generators)}.")
        at_least(self, "shard_rows", 1)
        at_least(self, "max_bytes", 1)


@dataclass
class IngestResult:
    added: int = 0
    already_in_store: int = 0
    duplicates_in_source: int = 0
    label_conflicts: int = 0  # contents brought under another label than the store's: recorded, not applied
    # (stored label or None: a twin in this read, claimed label, claimed generator) → contents
    conflicts: Counter[tuple[int | None, int, str]] = field(default_factory=Counter)
    labelled_unlabelled: int = 0  # unlabelled samples this ingest brought with a label (now labelled)
    unlabelled: int = 0  # of `added`: samples without a label
    missing_captions: int = 0  # added labelled samples whose caption is missing or empty
    units_read: int = 0
    units_skipped: int = 0  # read before, unchanged, same options: not opened again
    units_resumed: int = 0  # of units_read: grown files read from where the last read stopped
    rechecked: int = 0  # D3 rows quarantined as real_image_missing looked up again (the folder changed)
    resolved: Counter[str] = field(default_factory=Counter)  # of those, now found: by the reason resolved
    problems: Counter[str] = field(default_factory=Counter)
    shards: list[Path] = field(default_factory=list)
    by_split: Counter[str] = field(default_factory=Counter)
    # images already in the store under another generator name: (name here, name there) → count.
    # Ingesting D3's webdataset form into a store holding its Parquet form checks --generators.
    generator_mismatches: Counter[tuple[str, str]] = field(default_factory=Counter)
    # D3: sentences where the --generators order disagrees with the Parquet rows read or the store's
    # other D3 forms (also noted through the reporter as found); see `pipeline.sources.d3_order`
    generator_warnings: list[str] = field(default_factory=list)

    @property
    def conflict_sentences(self) -> list[str]:
        """What the label conflicts of this ingest did, loudly: one sentence per kind of claim."""
        out = []
        for (stored, claimed, generator), n in sorted(self.conflicts.items(), key=lambda kv: -kv[1]):
            claim = f"{LABEL_NAMES[claimed]} ({generator})" if claimed else LABEL_NAMES[claimed]
            kept = (f"the store holds {'it' if n == 1 else 'them'} as {LABEL_NAMES[stored]} and keeps that label"
                    if stored is not None else "the first copy read was kept with its own label")
            out.append(f"{n} image{'s' if n != 1 else ''} came labelled {claim}, but {kept}: training data is "
                       "unchanged. `pipeline conflicts list` shows them; `pipeline conflicts resolve SAMPLE --label "
                       "real|generated|none` decides one (`--undo` reverses it).")
        return out


class Source(Protocol):
    def options(self) -> dict[str, object]: ...
    def growing(self) -> list[Path]: ...  # files read from where the last read stopped, if only grown
    def units(self, resume: Mapping[str, Resume]) -> Iterator[Unit]: ...  # resume: by file uri
    def items(self, unit: Unit) -> Items: ...  # returns where the next read of a growing file starts


def run(config: IngestConfig, reporter: Reporter | None = None) -> IngestResult:
    """Read the source, add samples the store lacks, quarantine what cannot be read."""
    reporter = reporter or Silent()
    source = open_source(config)  # a source that cannot be read stops before the store is touched
    with writing(config.store, reporter, config.wait, create=True):
        return _ingest(config, source, reporter)


def open_source(config: IngestConfig) -> Source:
    limits = Limits(config.max_bytes)
    if config.format == "d3":
        return D3Source(config.source, config.real_images, config.generators, limits,
                        config.store.root / "cache" / "real-images")
    if config.format == "folder":
        return FolderSource(config.source, config.group_by, limits, config.unlabelled)
    if config.format == "webdataset":
        return WebdatasetSource(config.source, config.generator, config.label_map, limits, config.unlabelled)
    return ManifestSource(config.source, limits)


# --- the loop -------------------------------------------------------------------------------


@dataclass
class _Pending:
    samples: list[dict[str, Any]] = field(default_factory=list)
    problems: list[dict[str, Any]] = field(default_factory=list)
    units: list[dict[str, Any]] = field(default_factory=list)


def _ingest(config: IngestConfig, source: Source, reporter: Reporter) -> IngestResult:
    reporter.start("ingest", None, "img")
    digest = _options_digest(config, source)
    now = datetime.now(UTC)
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)  # as stored (ms): this run's rows are found
    result = IngestResult()
    pending = _Pending()
    queries = {**ledger_queries(digest), "samples": KeyQuery("samples", "sample_id"),
               "problems": KeyQuery("quarantine", PROBLEM_KEY, "stage = 'ingest'")}
    check = source.order_check(config.store) if isinstance(source, D3Source) else None
    with StoreKeys(config.store, queries, maintained=("samples", "problems")) as known:
        resume = resume_points(config.store, digest, source.growing())
        for chunk in _chunks(source.units(resume), _UNIT_CHUNK):
            todo = unread(chunk, known)
            result.units_skipped += len(chunk) - len(todo)
            if todo and check is not None:
                check.tell(reporter)  # the webdataset form's order against the store: before it writes
            for unit in todo:
                items = 0
                reading = Returning(source.items(unit))
                for item in reading:
                    items += 1
                    reporter.advance("ingest", 1)
                    _take(item, pending, config, result, now, known)
                pending.units.append(ledger_row(unit, digest, items, now, reading.value))
                result.units_read += 1
                result.units_resumed += unit.resume is not None
                if len(pending.units) >= config.shard_rows:
                    _flush(config.store, pending, result, now, known)
        _flush(config.store, pending, result, now, known)
        if check is not None and result.units_read:
            result.generator_warnings = check.tell(reporter)
        folder = source.real_images_unit() if isinstance(source, D3Source) else None
        if isinstance(source, D3Source) and folder is not None and unread([folder], known):
            _recheck_real_images(config, source, folder, digest, now, result, known, reporter)
    result.added = sum(result.by_split.values())
    result.unlabelled = result.by_split[UNLABELLED]
    return result


def _take(item: Candidate | Problem, pending: _Pending, config: IngestConfig, result: IngestResult, now: datetime,
          known: StoreKeys) -> None:
    """One item read: a sample row or a quarantine row, flushed when a shard's worth is pending."""
    if isinstance(item, Problem):
        pending.problems.append(_problem_row(item, now))
    else:
        pending.samples.append(_sample_row(item, config, now))
    if max(len(pending.samples), len(pending.problems)) >= config.shard_rows:
        _flush(config.store, pending, result, now, known)


def _recheck_real_images(config: IngestConfig, source: D3Source, folder: Unit, digest: str, now: datetime,
                         result: IngestResult, known: StoreKeys, reporter: Reporter) -> None:
    """The real-images folder changed since it was recorded: look up the D3 rows quarantined as
    missing their real image by earlier runs (this run's were looked up in this index) and not
    resolved yet; those found become samples beside a `Resolved` row, committed together, and the
    folder's ledger row comes last (a kill looks up again only what is still unresolved)."""
    pending = _Pending()
    for batch in _missing_real_images(config.store, source, now):
        result.rechecked += batch.num_rows
        for item in source.recheck(batch):
            if isinstance(item, Resolved):
                pending.problems.append(_resolved_row(item, now))
                continue
            reporter.advance("ingest", 1)
            _take(item, pending, config, result, now, known)
    pending.units.append(ledger_row(folder, digest, result.resolved[REAL_MISSING], now))
    _flush(config.store, pending, result, now, known)


def _missing_real_images(store: Store, source: D3Source, now: datetime) -> Iterator[pa.RecordBatch]:
    """The quarantine rows of `source`'s Parquet files whose real image was missing, recorded before
    this run and not resolved since, sorted by file and row, a batch at a time (DuckDB holds the
    rest within `_RECHECK_MEMORY`, spilling to the store's scratch)."""
    if not source.files or not catalog.shard_paths(store, "quarantine"):
        return
    scratch = store.root / "cache" / f".recheck-{uuid.uuid4().hex[:8]}"
    try:
        with catalog.connect(store) as con:
            duck.limit_memory(con, _RECHECK_MEMORY, scratch)
            con.register("files", pa.table({"uri": [absolute(p) for p in source.files]}))
            reader = con.sql("""
                WITH q AS (SELECT reason, source_uri, source_member, source_row, recorded_at FROM quarantine
                           WHERE stage = 'ingest' AND reason IN ($missing, $resolved) AND source_row IS NOT NULL
                             AND source_member IS NOT NULL AND source_uri IN (SELECT uri FROM files))
                SELECT m.source_uri, m.source_member, m.source_row FROM q m
                ANTI JOIN (SELECT * FROM q WHERE reason = $resolved) r
                       ON m.source_uri = r.source_uri AND m.source_member = r.source_member
                      AND m.source_row = r.source_row
                WHERE m.reason = $missing AND m.recorded_at <> $now
                ORDER BY m.source_uri, m.source_member, m.source_row
            """, params={"missing": REAL_MISSING, "resolved": RESOLVED + REAL_MISSING, "now": now}
            ).to_arrow_reader(_RECHECK_BATCH)
            yield from reader
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _chunks(units: Iterable[Unit], size: int) -> Iterator[list[Unit]]:
    it = iter(units)
    while chunk := list(islice(it, size)):
        yield chunk


def _options_digest(config: IngestConfig, source: Source) -> str:
    """What, besides a unit's bytes, decides the rows it becomes: a change means read it again."""
    options = {
        "format": config.format,
        "source": source.options(),
        "splits": list(config.split_fractions) if config.splits_from == "hash" else "source",
        "split_seed": config.split_seed,
        "max_bytes": config.max_bytes,
    }
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _flush(store: Store, pending: _Pending, result: IngestResult, now: datetime, known: StoreKeys) -> None:
    """De-duplicate the chunk against itself and the store, then write and commit it at once:
    samples, quarantine and the ledger rows of units finished (ledger last, so a kill re-reads)."""
    if not (pending.samples or pending.problems or pending.units):
        return
    samples, problems, decisions = _classify(store, pending.samples, now, result, known)
    problems, problem_keys = _new_problems(store, pending.problems + problems, result, known)
    written = []
    if samples:
        written.append(write_parquet(from_rows(SAMPLES, samples),
                                     store.new_shard(store.dataset_dir("samples"), "samples")))
    if decisions:
        written.append(write_parquet(from_rows(DECISIONS, decisions),
                                     store.new_shard(store.dataset_dir("decisions"), "ingest")))
    if problems:
        written.append(write_parquet(from_rows(QUARANTINE, problems),
                                     store.new_shard(store.dataset_dir("quarantine"), "ingest")))
    if pending.units:
        written.append(write_parquet(from_rows(SOURCES, pending.units),
                                     store.new_shard(store.dataset_dir("sources"), "sources")))
    if written:
        writes.commit(store, written)
    if samples:  # later chunks of this run (and later runs) must find them
        known.add("samples", keys_of(pa.array([r["sample_id"] for r in samples], pa.string())))
    if problems:
        known.add("problems", problem_keys)
    result.shards.extend(p for p in written if p.parent.name == "samples")
    pending.samples.clear()
    pending.problems.clear()
    pending.units.clear()


def _classify(store: Store, rows: list[dict[str, Any]], now: datetime, result: IngestResult, known: StoreKeys
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Split a chunk into new samples, label-conflict claims and `labelled` decisions (an unlabelled
    sample brought with a label); count duplicates. One query per chunk; it reads the store's rows
    only for the ids its key set holds (duplicates, rare unless a changed source is read again).

    A content's first labelled copy wins: the store's, else the first read in this chunk; a copy under
    the other label becomes a claim (quarantine, `label_conflict`) and changes nothing. Unlabelled
    copies never conflict: they are duplicates of any copy there is."""
    if not rows:
        return [], [], []
    ids = pa.array([r["sample_id"] for r in rows], pa.string())
    stored_ids = np.zeros(len(rows), bool)
    if catalog.shard_paths(store, "samples"):
        stored_ids = known.get("samples").contains(keys_of(ids))
    chunk = pa.table({
        "i": pa.array(range(len(rows)), pa.int64()),
        "sample_id": ids,
        "label": pa.array([r["label"] for r in rows], pa.int8()),
        "stored": stored_ids,
    })
    has_samples = bool(stored_ids.any())
    stored = """
        LEFT JOIN (SELECT sample_id, any_value(label) FILTER (WHERE label IS NOT NULL) AS label,
                          any_value(source_uri) AS uri, any_value(source_member) AS member,
                          bool_or(ingested_at = ?) AS this_run, true AS present,
                          any_value(generator) FILTER (WHERE label IS NOT NULL) AS generator
                   FROM samples_all WHERE sample_id IN (SELECT sample_id FROM c WHERE stored) GROUP BY sample_id) s
        USING (sample_id)
    """ if has_samples else "LEFT JOIN (SELECT NULL::VARCHAR AS sample_id, NULL::TINYINT AS label, " \
        "NULL::VARCHAR AS uri, NULL::VARCHAR AS member, NULL::BOOLEAN AS this_run, NULL::BOOLEAN AS present, " \
        "NULL::VARCHAR AS generator) s USING (sample_id)"
    table = catalog.query_with(store, f"""
        SELECT c.i, row_number() OVER (PARTITION BY c.sample_id ORDER BY c.label IS NULL, c.i) = 1 AS first,
               s.label AS stored_label, s.uri AS stored_uri, s.member AS stored_member, s.this_run,
               coalesce(s.present, false) AS present, s.generator AS stored_generator
        FROM c {stored}
        ORDER BY c.i
    """, {"c": chunk}, [now] if has_samples else None)
    new: list[dict[str, Any]] = []
    conflicts: list[dict[str, Any]] = []
    decisions: list[dict[str, Any]] = []
    infos = table.to_pylist()
    # the copy of each content this chunk keeps: its first labelled one, else its first
    first_of = {rows[info["i"]]["sample_id"]: rows[info["i"]] for info in infos if info["first"]}
    for info in infos:
        row = rows[info["i"]]
        twin = first_of[row["sample_id"]]
        if info["stored_label"] is not None or (info["present"] and row["label"] is None):
            if row["label"] is None or info["stored_label"] == row["label"]:
                if info["this_run"]:
                    result.duplicates_in_source += 1
                else:
                    result.already_in_store += 1
                    stored_gen = info["stored_generator"]
                    if row["label"] is not None and canonical(stored_gen or "") != row["generator"]:
                        result.generator_mismatches[(row["generator"], stored_gen)] += 1  # not an old spelling
                continue
            other = where(info["stored_uri"], info["stored_member"], None)
            conflicts.append(conflict_row(row, other, int(info["stored_label"]), now))
            result.conflicts[(int(info["stored_label"]), int(row["label"]), row["generator"])] += 1
            continue
        if twin is not row:  # a later copy in this chunk
            if row["label"] is not None and row["label"] != twin["label"]:
                conflicts.append(conflict_row(row, where(twin["source_uri"], twin["source_member"],
                                                         twin["source_row"]), int(twin["label"]), now))
                result.conflicts[(None, int(row["label"]), row["generator"])] += 1
            else:
                result.duplicates_in_source += 1
            continue
        new.append(row)
        result.by_split[row["split"]] += 1
        if row["label"] is not None and info["present"]:  # stored unlabelled: its labelled row takes over
            decisions.append({"sample_id": row["sample_id"], "action": "labelled", "label": row["label"],
                              "generator": row["generator"], "note": f"ingest {row['source_uri']}",
                              "decided_at": now})
            result.labelled_unlabelled += 1
        if not row["text"] and row["label"] is not None:  # (an unlabelled sample is never trained on)
            result.missing_captions += 1
    result.label_conflicts += len({c["content_hash"] for c in conflicts})
    return new, conflicts, decisions


def _new_problems(store: Store, rows: list[dict[str, Any]], result: IngestResult,
                  known: StoreKeys) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Problems not yet in quarantine (same reason, same place): a rerun records nothing twice.
    Returns them and their keys."""
    for r in rows:
        if not r["reason"].startswith(RESOLVED):
            result.problems[r["reason"]] += 1
    if not rows:
        return [], np.empty(0, "S16")
    keys = keys_of(pa.table({
        "reason": [r["reason"] for r in rows],
        "source_uri": pa.array([r["source_uri"] for r in rows], pa.string()),
        "source_member": pa.array([r["source_member"] for r in rows], pa.string()),
        "source_row": pa.array([r["source_row"] for r in rows], pa.int64()),
    }), PROBLEM_KEY)
    fresh = first_occurrence(keys)
    if catalog.shard_paths(store, "quarantine"):
        fresh &= ~known.get("problems").contains(keys)
    new = [r for r, f in zip(rows, fresh, strict=True) if f]
    for r in new:
        if r["reason"].startswith(RESOLVED):
            result.resolved[r["reason"].removeprefix(RESOLVED)] += 1
    return new, keys[fresh]


# --- rows -----------------------------------------------------------------------------------


def _sample_row(item: Candidate, config: IngestConfig, now: datetime) -> dict[str, Any]:
    group = item.group_key or f"image:{item.sample_id}"
    loc = item.location
    declared = item.split if config.splits_from == "source" else None
    unlabelled = config.unlabelled or item.label is None
    return {
        "sample_id": item.sample_id,
        "label": None if unlabelled else item.label,
        "generator": None if unlabelled else item.generator,
        "generator_original": None if unlabelled else item.generator_original,
        "split": UNLABELLED if unlabelled else (declared or _manifest_split(item, config) or assign_split(
            group, config.split_fractions, config.split_seed)),
        "group_key": group,
        "text": item.text,
        "text_hash": text_hash(item.text) if item.text else None,
        "source_format": config.format,
        "source_uri": loc.uri,
        "source_member": loc.member,
        "source_row": loc.row,
        "byte_offset": loc.offset,
        "byte_length": loc.length if loc.length is not None else item.size,
        "ingested_at": now,
    }


def _manifest_split(item: Candidate, config: IngestConfig) -> str | None:
    # a manifest's split column has always been kept; D3's declared splits need --splits source
    return item.split if config.format == "manifest" else None


def _problem_row(problem: Problem, now: datetime) -> dict[str, Any]:
    loc = problem.location
    return {
        "content_hash": problem.content_hash,
        "stage": "ingest",
        "reason": problem.reason,
        "detail": problem.detail,
        "source_uri": loc.uri,
        "source_member": loc.member,
        "source_row": loc.row,
        "recorded_at": now,
    }


def _resolved_row(resolved: Resolved, now: datetime) -> dict[str, Any]:
    loc = resolved.location
    return {
        "content_hash": None,
        "stage": "ingest",
        "reason": RESOLVED + resolved.reason,
        "detail": resolved.detail,
        "source_uri": loc.uri,
        "source_member": loc.member,
        "source_row": loc.row,
        "recorded_at": now,
    }
