"""`pipeline export --run RUN --output DIR`: a run's detector as a folder that travels alone.

The folder has the layout models are shared in on the Hugging Face Hub: `model.safetensors` (the MLP),
`config.json` (MLP shape, features, input normalisation, the CLIP model key with its architecture,
pretrained tag and preprocessing digest, the threshold chosen on val, the calibration, the OOD rule),
`ood.safetensors` (a k-means sketch of the training images, `features.ood.CentroidSketch`) and
`README.md` (the model card: data, per-generator metrics with intervals, the alarms that fired,
limits). `pipeline predict --detector DIR` and `Detector.load(DIR)` use it with no store. A run
trained before calibration existed is calibrated here, from its stored val scores (deterministically).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline.config import Validated
from pipeline.errors import PipelineError
from pipeline.features.ood import centroid_sketch
from pipeline.features.vectors import open_matrix
from pipeline.features.view import feature_table
from pipeline.present.card import model_card
from pipeline.reporting import Reporter, Silent
from pipeline.runs.detector import CONFIG, export, from_run
from pipeline.runs.record import load_run_record
from pipeline.store import catalog
from pipeline.store.layout import Store
from pipeline.store.writes import require_writable


@dataclass(frozen=True)
class ExportConfig(Validated):
    store: Store
    run_id: str
    output: Path
    force: bool = False  # replace the files of a detector already in the folder
    wait: bool = True

    def check(self) -> None:
        target = self.output.expanduser().resolve()
        root = self.store.root.expanduser().resolve()
        if target == root or root in target.parents:
            raise PipelineError(f"--output {self.output} is inside the store; a detector travels outside it.")
        if target.exists() and not target.is_dir():
            raise PipelineError(f"--output {self.output} is a file; give a folder.")
        if (target / CONFIG).exists() and not self.force:
            raise PipelineError(f"{self.output} already holds a detector; --force replaces it.")


@dataclass
class ExportResult:
    run_id: str
    folder: Path
    files: list[Path] = field(default_factory=list)
    random_weights: bool | None = None
    alarms: list[str] = field(default_factory=list)  # the run's, as the card shows them


def run(config: ExportConfig, reporter: Reporter | None = None) -> ExportResult:
    """Write the folder; see the module docstring."""
    reporter = reporter or Silent()
    store = config.store
    catalog.snapshot(store)
    require_writable(store, "export", "the caches it reads the training images through")
    detector = from_run(store, config.run_id, ood=False)
    run_config, metrics = load_run_record(store, config.run_id)
    table = feature_table(store, metrics.model_key, run_config.pairing, reporter=reporter)
    matrix = open_matrix(store, metrics.model_key, "image", reporter)
    sketch = centroid_sketch(store, config.run_id, matrix, table.parts_sql, run_config.train_generators,
                             run_config.seed)
    card = model_card(replace(detector.spec, ood=sketch.spec), metrics, config.run_id, run_config.flat())
    files = export(detector, sketch, config.output, card)
    return ExportResult(config.run_id, config.output, files, metrics.random_weights,
                        [a.sentence for a in metrics.alarms])
