"""`from pipeline import Detector`: a trained detector in a notebook, on the same code path as the CLI.

    from pipeline import Detector
    table = Detector.load("detectors/sdxl-v1").predict(["a.jpg", "b.png"])             # an exported folder
    table = Detector.load(RUN_ID, store="data/store").predict(paths, captions=texts)  # a run of a store

`predict` runs the `predict` stage (`pipeline.stages.predict`) with the rows collected, and returns
them as a `pyarrow.Table` (`schemas.PREDICTIONS`: path, sha256, score, generated, threshold,
probability, ood, similarity, cached, reason, detail, neighbours). For more images than fit in memory
use `predict_to(folder, paths)` (`pipeline predict … --output DIR/`): Parquet parts written as they
are done, resumed by a rerun, on this machine or a Ray cluster (`engine="ray"`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.store.layout import DEFAULT_STORE, Store


@dataclass(frozen=True)
class Detector:
    """A run of a store (`run_id`, `store`) or an exported folder (`folder`), ready to predict."""

    run_id: str | None = None
    store: Store | None = None
    folder: Path | None = None

    @staticmethod
    def load(dir_or_run: str | Path, store: str | Path | Store | None = None) -> Detector:
        """An exported detector folder (it has a config.json), else a run id of `store` (default
        data/store). Checked now: a missing folder or run is one sentence here, not at predict."""
        path = Path(dir_or_run)
        if (path / "config.json").is_file():
            from pipeline.runs.detector import from_folder

            from_folder(path)  # (reads and checks it)
            return Detector(folder=path)
        held = store if isinstance(store, Store) else Store(Path(store) if store is not None else DEFAULT_STORE)
        from pipeline.runs.record import load_run_record

        if path.is_dir():
            raise PipelineError(f"{path} is a folder without config.json: not an exported detector.")
        load_run_record(held, str(dir_or_run))  # (a run that is not there: one sentence)
        return Detector(run_id=str(dir_or_run), store=held)

    def predict(self, paths: Sequence[str | Path], captions: Sequence[str | None] | None = None, *,
                threshold: float | None = None, explain: int = 0, keep: bool = False, device: str = "auto",
                precision: str = "fp32", batch_size: int = 64, workers: int | None = 0) -> pa.Table:
        """One row per image found in `paths` (files, folders, tars, lists), in order; `captions`, if
        given, one per path (None where there is none), for image+text detectors."""
        from pipeline.stages import predict as stage

        with tempfile.TemporaryDirectory(prefix="pipeline-detector-") as work:
            sources = [Path(p) for p in paths]
            if captions is not None:
                if len(captions) != len(paths):
                    raise PipelineError(f"captions has {len(captions)} entries for {len(paths)} paths: give one "
                                        "per path (None where there is none).")
                listed = Path(work) / "inputs.parquet"  # a list of paths with captions, as `predict` reads one
                pq.write_table(pa.table({"path": [str(p.absolute()) for p in sources],
                                         "caption": pa.array(list(captions), pa.string())}), listed)
                sources = [listed]
            config = stage.PredictConfig(
                tuple(sources), self.store, self.run_id, self.folder, threshold=threshold, explain=explain, keep=keep,
                device=device, precision=precision, batch_size=batch_size, workers=workers,  # type: ignore[arg-type]
                collect=True)
            return stage.run(config).rows

    def predict_to(self, folder: str | Path, paths: Sequence[str | Path], *, engine: str = "local",
                   actors: int | None = None, ray_address: str | None = None, shard_rows: int = 4096,
                   force: bool = False, threshold: float | None = None, device: str = "auto",
                   precision: str = "fp32", batch_size: int = 64, workers: int | None = 0) -> Any:
        """Predict every image of `paths` into `folder` as Parquet parts (`part-NNNNN.parquet`, schema
        PREDICTIONS), `shard_rows` images each; a rerun after a crash skips the parts already there. Read
        them back with `pyarrow.dataset.dataset(folder)` or DuckDB's `read_parquet('folder/*.parquet')`.
        Returns the stage's `PredictResult` (counts, parts, images resumed), not the rows."""
        from pipeline.stages import predict as stage

        config = stage.PredictConfig(
            tuple(Path(p) for p in paths), self.store, self.run_id, self.folder, output=Path(folder),
            threshold=threshold, device=device, precision=precision, batch_size=batch_size,  # type: ignore[arg-type]
            workers=workers, engine=engine, actors=actors, ray_address=ray_address,  # type: ignore[arg-type]
            shard_rows=shard_rows, force=force)
        if not config.directory:
            raise PipelineError(f"predict_to writes a folder of Parquet parts: {folder} names a file; give a folder.")
        return stage.run(config)

    def __repr__(self) -> str:
        where = f"folder {self.folder}" if self.folder is not None else f"run {self.run_id} of {self.store}"
        return f"Detector({where})"
