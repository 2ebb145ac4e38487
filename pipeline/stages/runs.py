"""`pipeline runs list|show|rm`: the runs a store holds, one run in full, and removing runs.

`list` reads the `runs` view, one row per run (its cost grows with the number of runs, never with
samples). `show` reads one run's record: its config, its metrics with their intervals (as stored:
nothing is recomputed), its alarms, its files and its report. `rm` deletes runs' files and their rows
in `runs`, `scores` and `metrics` (a run's alarms live in its row) in one commit
(`pipeline.store.writes.remove`): a killed `rm` leaves each run whole or gone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, overload

from pipeline.config import Validated
from pipeline.errors import PipelineError
from pipeline.evaluation.results import RunMetrics
from pipeline.present import html
from pipeline.reporting import Reporter
from pipeline.runs.record import run_metrics, run_shards
from pipeline.store import catalog, cleanup, writes
from pipeline.store import manifest as manifests
from pipeline.store.cleanup import size_of
from pipeline.store.layout import Store
from pipeline.store.writes import writing


@dataclass(frozen=True)
class ListRuns(Validated):
    store: Store


@dataclass(frozen=True)
class ShowRun(Validated):
    store: Store
    run_id: str  # the id, or a prefix of it that names one run


@dataclass(frozen=True)
class RemoveRuns(Validated):
    store: Store
    run_ids: tuple[str, ...]  # whole ids: a prefix is not enough to delete
    wait: bool = True

    def check(self) -> None:
        if not self.run_ids:
            raise PipelineError("Name at least one run to remove (`pipeline runs list` shows them).")


@dataclass(frozen=True)
class RunRow:
    """A run as `runs list` shows it."""

    run_id: str
    name: str | None
    created_at: datetime
    model_key: str
    random_weights: bool | None
    detector: str
    features: str
    pairing: str
    val_auc: float | None
    test_auc: float | None
    alarms: int


@dataclass
class RunList:
    runs: list[RunRow] = field(default_factory=list)


@dataclass(frozen=True)
class RunFile:
    path: str  # relative to the store
    bytes: int
    committed: bool  # a shard in the views (else a file beside one: a checkpoint, a config, a report page)


@dataclass
class RunDetail:
    row: RunRow
    config: dict[str, Any]  # as the run recorded it: flat keys, as `train --config` takes them
    metrics: RunMetrics  # as stored: `metrics.split(s).estimate(metric, generator)` are the intervals
    files: list[RunFile]
    report: Path | None  # the run's report page, if `pipeline report` wrote one

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)


@dataclass
class RunsRemoved:
    run_ids: list[str]
    files: int
    bytes: int
    rows: dict[str, int]  # rows taken out of each table: runs, scores, metrics


@overload
def run(config: ListRuns, reporter: Reporter | None = None) -> RunList: ...
@overload
def run(config: ShowRun, reporter: Reporter | None = None) -> RunDetail: ...
@overload
def run(config: RemoveRuns, reporter: Reporter | None = None) -> RunsRemoved: ...


def run(config: ListRuns | ShowRun | RemoveRuns, reporter: Reporter | None = None
        ) -> RunList | RunDetail | RunsRemoved:
    if isinstance(config, ListRuns):
        return RunList(_rows(config.store))
    if isinstance(config, ShowRun):
        return _detail(config.store, config.run_id)
    return _remove(config, reporter)


_ROWS = """
    SELECT run_id, name, created_at, model_key,
           TRY_CAST(json_extract(metrics_json, '$.random_weights') AS BOOLEAN) AS random_weights,
           coalesce(json_extract_string(config_json, '$.detector'), 'mlp') AS detector, features,
           coalesce(json_extract_string(config_json, '$.pairing'), 'as-ingested') AS pairing,
           val_auc, test_auc, coalesce(json_array_length(metrics_json, '$.alarms'), 0) AS alarms
    FROM runs {where} ORDER BY created_at DESC, run_id
"""


def _rows(store: Store, where: str = "", params: list[object] | None = None) -> list[RunRow]:
    manifests.require_store(store)
    table = catalog.query(store, _ROWS.format(where=where), params)
    return [RunRow(**row) for row in table.to_pylist()]


def _resolve(store: Store, prefix: str) -> RunRow:
    found = _rows(store, "WHERE starts_with(run_id, ?)", [prefix]) if prefix else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise PipelineError(f"No run {prefix!r} in {store.root}; `pipeline runs list` shows them.")
    raise PipelineError(f"{prefix!r} names {len(found)} runs ({', '.join(r.run_id for r in found[:3])}"
                        f"{', …' if len(found) > 3 else ''}); give more of the id.")


def _detail(store: Store, run_id: str) -> RunDetail:
    row = _resolve(store, run_id)
    metrics = run_metrics(store, row.run_id)
    flat = json.loads((store.run_dir(row.run_id) / "config.json").read_text())
    committed = {s.path for s in run_shards(catalog.snapshot(store).manifest, row.run_id)}
    paths = {*committed, *(store.relative(p) for p in _beside(store, row.run_id))}
    files = [RunFile(rel, size_of(store.root / rel).bytes, rel in committed) for rel in sorted(paths)]
    page = store.run_report_dir(row.run_id) / "index.html"
    return RunDetail(row, flat, metrics, files, page if page.exists() else None)


def _beside(store: Store, run_id: str) -> list[Path]:
    """A run's files that are not shards: everything in its folder, and its report's files."""
    folders = (store.run_dir(run_id), store.run_report_dir(run_id))
    return [p for folder in folders if folder.is_dir() for p in sorted(folder.rglob("*")) if p.is_file()]


def _remove(config: RemoveRuns, reporter: Reporter | None) -> RunsRemoved:
    store = config.store
    manifests.require_store(store)
    with writing(store, reporter, config.wait):
        manifest = catalog.snapshot(store).manifest  # (a fresh snapshot: the writer's)
        missing = [r for r in config.run_ids if f"runs/{r}/run.parquet" not in manifest.shards]
        if missing:
            raise PipelineError(f"No run {missing[0]!r} in {store.root} (`pipeline runs list` shows the ids); "
                                "nothing was removed.")
        shards = [s for r in dict.fromkeys(config.run_ids) for s in run_shards(manifest, r)]
        reports = [store.run_report_dir(r) for r in config.run_ids if store.run_report_dir(r).is_dir()]
        folders = [store.run_dir(r) for r in config.run_ids] + reports
        rows: dict[str, int] = {}
        for s in shards:
            rows[s.dataset] = rows.get(s.dataset, 0) + s.num_rows
        removed = writes.remove(store, [s.path for s in shards], folders)
        for run_id in config.run_ids:  # its out-of-distribution reference (predict's), unless read right now
            for unit in sorted((store.root / "cache" / "ood").glob(f"*/{run_id}")):
                cleanup.clear_cache(unit)  # (None: a predict pins it; `pipeline clean` takes it later)
        if reports:
            html.index_reports(store.reports_dir)  # the index lists what is left
    return RunsRemoved(list(dict.fromkeys(config.run_ids)), removed.files, removed.bytes, rows)
