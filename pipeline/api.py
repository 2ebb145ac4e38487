"""The Python API: `from pipeline import Store`, the stages the CLI runs, for notebooks and scripts.

    from pipeline import Store

    store = Store("data/store")
    store.sql("SELECT generator, count(*) AS n FROM samples GROUP BY ALL")  # a pyarrow.Table
    run = store.train(features="image", epochs=8)                           # a TrainResult
    store.runs()                                                            # every run

Each method takes its stage's config fields as keyword options (`store.encode(model="ViT-B-32",
pretrained="openai", batch_size=128)`; training options as `pipeline train --config` takes them),
builds that config and calls the stage's `run`: the CLI and the API call the same functions and return
the same typed results. A mistake is a `PipelineError` with a sentence, as on the command line.
Nothing heavy is imported before a method needs it: `import pipeline` loads no torch, DuckDB or Arrow.

This `Store` is a facade over the store on disk (`pipeline.store.layout.Store`, its `.layout`), which
stays a plain value every layer below passes around: the stages cannot live on it (the store layer
imports no stage).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Any, Union, get_args, get_origin, get_type_hints

from pipeline.errors import PipelineError
from pipeline.reporting import Reporter, Silent
from pipeline.store import layout

if TYPE_CHECKING:  # the results the methods return (imported for their types only)
    import pyarrow as pa

    from pipeline.compositions.experiment import ExperimentResult
    from pipeline.compositions.sweep import SweepResult
    from pipeline.stages.clean import CleanResult
    from pipeline.stages.encode import EncodeResult
    from pipeline.stages.import_features import ImportResult
    from pipeline.stages.index import IndexInfo
    from pipeline.stages.ingest import IngestResult
    from pipeline.stages.landscape import LandscapeResult
    from pipeline.stages.leaks import LeakResult
    from pipeline.stages.neighbors import NeighborResult
    from pipeline.stages.perturb import PerturbResult
    from pipeline.stages.report import ReportResult
    from pipeline.stages.runs import RunDetail, RunList, RunsRemoved
    from pipeline.stages.score import ScoreResult
    from pipeline.stages.status import StoreStatus
    from pipeline.stages.train import TrainResult
    from pipeline.stages.verify import VerifyResult
    from pipeline.store.writes import Reconciled

PathLike = str | os.PathLike[str]


class Store:
    """A store on disk and the stages that read and write it (see the module's docstring)."""

    def __init__(self, path: PathLike = layout.DEFAULT_STORE, reporter: Reporter | None = None) -> None:
        self.layout = layout.Store(Path(path).expanduser())
        self.reporter: Reporter = reporter or Silent()  # progress and notes (the CLI passes rich bars)

    @property
    def path(self) -> Path:
        return self.layout.root

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    # --- reading ------------------------------------------------------------------------------

    def sql(self, query: str, allow_files: bool = False, memory_limit: str | None = None,
            timeout: float | None = None) -> pa.Table:
        """One read-only query over the store's views, in the sandbox of `pipeline sql` (its memory limit,
        a quarter of the machine's by default, and `timeout` in seconds). The whole result is held in
        memory: bound it with LIMIT (`pipeline sql --output` streams)."""
        from pipeline.stages import sql

        limit = memory_limit or sql.DEFAULT_MEMORY_LIMIT
        sql.check_limits(limit, timeout)
        return sql.run_query(self.layout, query, allow_files, limit, timeout)

    def status(self) -> StoreStatus:
        from pipeline.stages import status

        return status.run(status.StatusConfig(self.layout), self.reporter)

    def runs(self) -> RunList:
        """Every run, newest first (`.runs` is a list of rows)."""
        from pipeline.stages import runs

        return runs.run(runs.ListRuns(self.layout))

    def run(self, run_id: str) -> RunDetail:
        """One run: config, metrics with their intervals, files, report."""
        from pipeline.stages import runs

        return runs.run(runs.ShowRun(self.layout, run_id))

    def neighbors(self, **options: Any) -> NeighborResult:
        """`NeighborQuery` options: sample_id= or image=, k, model_key, run_id, modality."""
        from pipeline.stages import neighbors

        return neighbors.run(_config(neighbors.NeighborQuery, "neighbors", store=self.layout, **options),
                             self.reporter)

    # --- writing ------------------------------------------------------------------------------

    def ingest(self, source: PathLike, format: str, **options: Any) -> IngestResult:
        """`IngestConfig` options: real_images, generator, label_map, generators, group_by, split_fractions…"""
        from pipeline.stages import ingest

        config = _config(ingest.IngestConfig, "ingest", store=self.layout, source=source, format=format, **options)
        return ingest.run(config, self.reporter)

    def import_features(self, source: PathLike, layout: str, model_key: str, **options: Any) -> ImportResult:
        from pipeline.stages import import_features

        config = _config(import_features.ImportConfig, "import_features", store=self.layout, source=source,
                         layout=layout, model_key=model_key, **options)
        return import_features.run(config, self.reporter)

    def encode(self, model: str, pretrained: str | None = None, seed: int = 0, **options: Any) -> EncodeResult:
        """`model` is an open_clip architecture; `pretrained` a tag or checkpoint (None: random weights).
        `EncodeConfig` options: device, precision, batch_size, workers, dtype, engine…"""
        from pipeline.encoding.clip import ModelSpec
        from pipeline.stages import encode

        config = _config(encode.EncodeConfig, "encode", store=self.layout, model=ModelSpec(model, pretrained, seed),
                         **options)
        return encode.run(config, self.reporter)

    def train(self, config: PathLike | None = None, wait: bool = True, **options: Any) -> TrainResult:
        """Options as `pipeline train --config FILE` takes them (features, epochs, cvar_alpha, sam…);
        `config`: such a TOML file, which the options override."""
        from pipeline.config import read_toml
        from pipeline.runs.config import TrainConfig
        from pipeline.stages import train

        flat = {**(read_toml(Path(config), "config") if config is not None else {}), **options}
        return train.run(train.TrainJob(self.layout, TrainConfig.from_dict(flat), wait=wait), self.reporter)

    def sweep(self, grid: PathLike | dict[str, Any], **options: Any) -> SweepResult:
        """`grid`: a TOML file as `pipeline sweep --grid` reads, or its contents as a dict ([base] + [grid]
        lists or [[runs]]). `SweepConfig` options: jobs, engine, samples, seed, scheduler…"""
        from pipeline.compositions import sweep

        points = sweep.expand(grid) if isinstance(grid, dict) else sweep.grid_points(Path(grid))
        config = _config(sweep.SweepConfig, "sweep", store=self.layout, points=tuple(points), **options)
        return sweep.run(config, self.reporter)

    def experiment(self, table: str, seeds: int = 1, run_id: str | None = None, **options: Any) -> ExperimentResult:
        """`table`: table1, table2, generalization or robustness (with `run_id`); the training options every
        row shares as keywords (epochs, pairing, model_key…)."""
        from pipeline.compositions import experiment

        config = experiment.ExperimentConfig(self.layout, table, options, seeds, run_id)  # type: ignore[arg-type]
        return experiment.run(config, self.reporter)

    def score(self, run_id: str, wait: bool = True) -> ScoreResult:
        from pipeline.stages import score

        return score.run(score.ScoreConfig(self.layout, run_id, wait), self.reporter)

    def index(self, **options: Any) -> IndexInfo:
        """`IndexConfig` options: model_key, kind, modality, nlist, max_memory ("4GB" or bytes)…"""
        from pipeline.stages import index

        return index.run(_config(index.IndexConfig, "index", store=self.layout, **_memory(options)), self.reporter)

    def leaks(self, **options: Any) -> LeakResult:
        """`LeakConfig` options: model_key, threshold, k, exact_search, max_memory…"""
        from pipeline.stages import leaks

        return leaks.run(_config(leaks.LeakConfig, "leaks", store=self.layout, **_memory(options)), self.reporter)

    def perturb(self, ops: list[str] | tuple[str, ...], **options: Any) -> PerturbResult:
        """`ops` as `--ops` takes them ("jpeg:90,75", "blur:1"); `PerturbConfig` options: splits, limit."""
        from pipeline.stages import perturb

        config = _config(perturb.PerturbConfig, "perturb", store=self.layout, ops=tuple(ops), **options)
        return perturb.run(config, self.reporter)

    def report(self, run_id: str, **options: Any) -> ReportResult:
        from pipeline.stages import report

        config = _config(report.ReportConfig, "report", store=self.layout, run_id=run_id, **options)
        return report.run(config, self.reporter)

    def landscape(self, runs: list[str] | tuple[str, ...], **options: Any) -> LandscapeResult:
        from pipeline.stages import landscape

        config = _config(landscape.LandscapeConfig, "landscape", store=self.layout, runs=tuple(runs), **options)
        return landscape.run(config, self.reporter)

    def remove_runs(self, *run_ids: str, wait: bool = True) -> RunsRemoved:
        """Remove runs (whole ids) with their files and rows, in one commit (`pipeline runs rm`)."""
        from pipeline.stages import runs

        return runs.run(runs.RemoveRuns(self.layout, run_ids, wait), self.reporter)

    def clean(self, dry_run: bool = False, caches: bool = False, reports: bool = False) -> CleanResult:
        from pipeline.stages import clean

        return clean.run(clean.CleanConfig(self.layout, dry_run, caches, reports), self.reporter)

    def verify(self, repair: bool = False) -> VerifyResult:
        from pipeline.stages import verify

        return verify.run(verify.VerifyConfig(self.layout, repair), self.reporter)

    def rebuild_catalog(self) -> Reconciled:
        from pipeline.stages import rebuild

        return rebuild.run(rebuild.RebuildConfig(self.layout), self.reporter)


def _config(cls: type[Any], method: str, **values: Any) -> Any:
    """`cls(**values)` with paths given as text made `Path`s and lists made tuples; an option the config
    does not have is one sentence naming the ones it does."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        takes = ", ".join(sorted(fields - {"store"}))
        raise PipelineError(f"Store.{method}() has no option {', '.join(unknown)}; it takes {takes}.")
    hints = get_type_hints(cls)
    return cls(**{name: _coerce(hints[name], value) for name, value in values.items()})


def _coerce(hint: Any, value: Any) -> Any:
    """Paths given as text become `Path`s, lists tuples (of `Path`s where the field holds paths)."""
    if isinstance(value, str) and _admits(hint, Path) and not _admits(hint, str):
        return Path(value).expanduser()
    if isinstance(value, list | tuple) and _admits(hint, tuple):
        shape = hint if get_origin(hint) is tuple else next(a for a in get_args(hint) if get_origin(a) is tuple)
        return tuple(_coerce(get_args(shape)[0], v) for v in value)
    return value


def _admits(hint: Any, kind: type) -> bool:
    """Whether a field's type is `kind` (`Path`, `tuple[...]`) or a union holding it (`Path | None`)."""
    if hint is kind or get_origin(hint) is kind:
        return True
    return get_origin(hint) in (Union, UnionType) and any(_admits(a, kind) for a in get_args(hint))


def _memory(options: dict[str, Any]) -> dict[str, Any]:
    """`max_memory` as the CLI takes it ("4GB") or in bytes."""
    if isinstance(options.get("max_memory"), str):
        from pipeline.features.ann.plan import parse_memory

        return {**options, "max_memory": parse_memory(options["max_memory"])}
    return options
