"""`pipeline sweep`: many training configs over the same cached features; CLIP is never loaded.

A grid file (TOML) has `[base]` options for every run, and either `[grid]` (lists of values,
crossed) or `[[runs]]` (one table per run); `samples` draws that many of them at random (seeded)
instead of running all. Configs whose hash (config + data) already has a run are skipped, so a
sweep that was interrupted resumes where it stopped.

Engines: `local` trains here (`jobs` processes); `ray` hands each config to Ray Tune as one trial
— an ordinary `train` run — that reports its validation AUC every epoch, so the `asha` scheduler
can stop weak trials early (a stopped trial writes no run; the sweep lists it as stopped).
"""

from __future__ import annotations

import itertools
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.children import die_with
from pipeline.choices import Engine, Scheduler
from pipeline.config import Validated, at_least, read_toml
from pipeline.errors import PipelineError
from pipeline.features.view import feature_table, resolve_model_key
from pipeline.reporting import Reporter, Silent
from pipeline.runs.config import TrainConfig
from pipeline.stages import train
from pipeline.store.layout import Store


@dataclass(frozen=True)
class SweepPoint:
    """One config of a sweep: every training option, and those the grid set (what the table shows)."""

    options: dict[str, Any]
    overrides: dict[str, Any]

    @property
    def config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.options)


@dataclass
class SweepRow:
    run_id: str
    name: str | None
    skipped: bool
    val_auc: float | None
    test_auc: float | None
    overrides: dict[str, Any]
    stopped_after: int | None = None  # Ray Tune's scheduler stopped the trial after this many epochs


@dataclass
class SweepResult:
    rows: list[SweepRow] = field(default_factory=list)
    open_clip_imported: bool = False


def grid_points(grid_file: Path) -> list[SweepPoint]:
    return expand(read_toml(grid_file, "grid"))


def expand(spec: dict[str, Any]) -> list[SweepPoint]:
    """[base] + either the Cartesian product of [grid] or the listed [[runs]]."""
    base = spec.get("base", {})
    grid, runs = spec.get("grid"), spec.get("runs")
    if (grid is None) == (runs is None):
        raise PipelineError("A grid file needs either a [grid] table or [[runs]] entries (one of them).")
    if grid is not None:
        keys = sorted(grid)
        values = [v if isinstance(v, list) else [v] for v in (grid[k] for k in keys)]
        empty = [k for k, v in zip(keys, values, strict=True) if not v]
        if empty:  # a crossed empty list leaves no config at all: a sweep that would do nothing, quietly
            raise PipelineError(f"The grid's {', '.join(empty)} list is empty: give each [grid] list at least "
                                "one value (its lists are crossed, so an empty one leaves no config to run).")
        overrides = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]
    else:
        overrides = list(runs or [])
        if not overrides:
            raise PipelineError("The grid file's [[runs]] list is empty: give at least one run.")
    points = [SweepPoint({**base, **o}, o) for o in overrides]
    for p in points:  # validate every config before running any
        _ = p.config
    return points


@dataclass(frozen=True)
class SweepConfig(Validated):
    store: Store
    points: tuple[SweepPoint, ...]
    jobs: int = 1
    engine: Engine = "local"
    samples: int | None = None  # None: every config; N: N of them drawn at random with `seed`
    seed: int = 0
    scheduler: Scheduler = "fifo"  # ray engine only
    ray_address: str | None = None  # ray engine: None starts a local Ray instance
    cpus_per_trial: float = 1.0

    def check(self) -> None:
        at_least(self, "jobs", 1)
        at_least(self, "samples", 1)
        at_least(self, "cpus_per_trial", 0.25)
        if self.engine == "local" and (self.scheduler != "fifo" or self.ray_address):
            raise PipelineError("--scheduler and --ray-address need --engine ray.")


def chosen(config: SweepConfig) -> list[SweepPoint]:
    """The configs a sweep runs: all, or `samples` of them drawn without replacement (seeded)."""
    points = list(config.points)
    if config.samples is None or config.samples >= len(points):
        return points
    picked = np.random.default_rng(config.seed).choice(len(points), size=config.samples, replace=False)
    return [points[i] for i in sorted(picked)]


def run(config: SweepConfig, reporter: Reporter | None = None) -> SweepResult:
    """Train every config not trained yet; `jobs` > 1 trains in parallel processes (CLIP never loaded)."""
    reporter = reporter or Silent()
    store, points, jobs = config.store, chosen(config), config.jobs
    reporter.start("sweep", len(points), "runs")
    # build each feature table once, here, so parallel jobs never race to build it
    for p in points:
        cfg = p.config
        feature_table(store, resolve_model_key(store, cfg.model_key), cfg.pairing, reporter=reporter)  # (retries noted)
    if config.engine == "ray":
        from pipeline.engines.ray import TuneOptions, tune_sweep

        options = TuneOptions(config.scheduler, config.ray_address, config.cpus_per_trial)
        outcomes = tune_sweep(store, [p.options for p in points], train_one, options, reporter)
        rows = [_row(p, o) for p, o in zip(points, outcomes, strict=True)]
    elif jobs == 1:
        rows = []
        for p in points:
            rows.append(_row(p, train_one(store.root, p.options, None)))
            reporter.advance("sweep", 1)
    else:
        # each worker ends with this process, also when it is killed (else they train on, ~800 MB each)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=die_with,
                                 initargs=(os.getpid(),)) as pool:
            outcomes = list(pool.map(train_one, [store.root] * len(points), [p.options for p in points],
                                     [None] * len(points), [None] * len(points), [jobs] * len(points)))
        rows = [_row(p, o) for p, o in zip(points, outcomes, strict=True)]
    return SweepResult(rows, open_clip_imported="open_clip" in sys.modules)


def train_one(root: Path, options: dict[str, Any], threads: int | None,
              reporter: Reporter | None = None, jobs: int = 1) -> dict[str, Any]:
    """Train one config of a sweep (or find its run): what the local engine and every Tune trial call.
    `threads`: the CPUs a scheduler gave this trial (Ray); `jobs`: local jobs sharing the cores; the train
    stage picks the thread count from them (`trainer.threads.choose_threads`). Returns plain data (it
    crosses process boundaries): run_id, skipped, val_auc, test_auc."""
    job = train.TrainJob(Store(root), TrainConfig.from_dict(options), skip_existing=True, jobs=jobs,
                         max_threads=threads)
    result = train.run(job, reporter)
    return {"run_id": result.run_id, "skipped": result.skipped, "val_auc": result.metrics.val.auc,
            "test_auc": result.metrics.test.auc}


def _row(point: SweepPoint, outcome: dict[str, Any]) -> SweepRow:
    return SweepRow(outcome.get("run_id") or "", point.options.get("name"), bool(outcome.get("skipped")),
                    _num(outcome.get("val_auc")), _num(outcome.get("test_auc")), point.overrides,
                    stopped_after=outcome.get("stopped_after"))


def _num(value: Any) -> float | None:
    return None if value is None or value != value else float(value)
