"""Stage `sweep`: many training configs over the same cached features; CLIP is never loaded.

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
import sys
import tomllib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.config import Validated, at_least
from pipeline.errors import PipelineError
from pipeline.features.view import feature_table, resolve_model_key
from pipeline.reporting import Reporter, Silent
from pipeline.runs import TrainConfig
from pipeline.stages import train
from pipeline.stages.train import TrainJob
from pipeline.store.layout import Store


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


def grid_configs(grid_file: Path) -> list[dict[str, Any]]:
    try:
        spec = tomllib.loads(grid_file.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PipelineError(f"Cannot read grid {grid_file}: {exc}") from exc
    return expand(spec)


def expand(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """[base] + either the Cartesian product of [grid] or the listed [[runs]] (flat option dicts)."""
    base = spec.get("base", {})
    grid, runs = spec.get("grid"), spec.get("runs")
    if (grid is None) == (runs is None):
        raise PipelineError("A grid file needs either a [grid] table or [[runs]] entries (one of them).")
    if grid is not None:
        keys = sorted(grid)
        values = [v if isinstance(v, list) else [v] for v in (grid[k] for k in keys)]
        overrides = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]
    else:
        overrides = list(runs or [])
    configs = [{**base, **o, "__overrides__": o} for o in overrides]
    for c in configs:  # validate every config before running any
        TrainConfig.from_dict({k: v for k, v in c.items() if k != "__overrides__"})
    return configs


@dataclass(frozen=True)
class SweepConfig(Validated):
    store: Store
    configs: tuple[dict[str, Any], ...]  # flat option dicts, as `expand` gives them
    jobs: int = 1
    engine: Literal["local", "ray"] = "local"
    samples: int | None = None  # None: every config; N: N of them drawn at random with `seed`
    seed: int = 0
    scheduler: Literal["fifo", "asha"] = "fifo"  # ray engine only
    ray_address: str | None = None  # ray engine: None starts a local Ray instance
    cpus_per_trial: float = 1.0

    def check(self) -> None:
        at_least(self, "jobs", 1)
        at_least(self, "samples", 1)
        at_least(self, "cpus_per_trial", 0.25)
        if self.engine == "local" and (self.scheduler != "fifo" or self.ray_address):
            raise PipelineError("--scheduler and --ray-address need --engine ray.")


def chosen(config: SweepConfig) -> list[dict[str, Any]]:
    """The configs a sweep runs: all, or `samples` of them drawn without replacement (seeded)."""
    configs = list(config.configs)
    if config.samples is None or config.samples >= len(configs):
        return configs
    picked = np.random.default_rng(config.seed).choice(len(configs), size=config.samples, replace=False)
    return [configs[i] for i in sorted(picked)]


def run(config: SweepConfig, reporter: Reporter | None = None) -> SweepResult:
    """Train every config not trained yet; `jobs` > 1 trains in parallel processes (CLIP never loaded)."""
    reporter = reporter or Silent()
    store, configs, jobs = config.store, chosen(config), config.jobs
    reporter.start("sweep", len(configs), "runs")
    # build each feature table once, here, so parallel jobs never race to build it
    for c in configs:
        cfg = TrainConfig.from_dict({k: v for k, v in c.items() if k != "__overrides__"})
        feature_table(store, resolve_model_key(store, cfg.model_key), cfg.pairing)
    if config.engine == "ray":
        from pipeline.engines.ray import tune_sweep

        rows = tune_sweep(store, configs, config, reporter)
    elif jobs == 1:
        rows = []
        for c in configs:
            rows.append(_run_one(store.root, c, threads=None))
            reporter.advance("sweep", 1)
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            rows = list(pool.map(_run_one, [store.root] * len(configs), configs, [None] * len(configs),
                                 [None] * len(configs), [jobs] * len(configs)))
    return SweepResult(rows, open_clip_imported="open_clip" in sys.modules)


def _run_one(root: Path, flat: dict[str, Any], threads: int | None, reporter: Reporter | None = None,
             jobs: int = 1) -> SweepRow:
    """Train one config of a sweep (or find its run); the local engine and every Tune trial call this.
    `threads`: the CPUs a scheduler gave this trial (Ray); `jobs`: local jobs sharing the cores. The
    train stage picks the thread count from them (`trainer.threads.choose_threads`)."""
    overrides = flat.get("__overrides__", {})
    config = TrainConfig.from_dict({k: v for k, v in flat.items() if k != "__overrides__"})
    result = train.run(TrainJob(Store(root), config, skip_existing=True, jobs=jobs, max_threads=threads), reporter)
    return SweepRow(
        run_id=result.run_id,
        name=config.name,
        skipped=result.skipped,
        val_auc=result.metrics.get("val", {}).get("auc"),
        test_auc=result.metrics.get("test", {}).get("auc"),
        overrides=overrides,
    )
