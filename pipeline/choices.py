"""Every closed set of values an option takes, declared once: configs type their fields with these
(and `config.Validated` checks them with a sentence), the CLI offers them as choices.

Plain `Literal`s, with no import behind them, so that `pipeline --help` and a no-op stay cheap.
"""

from __future__ import annotations

from typing import Literal

SourceFormat = Literal["d3", "folder", "webdataset", "manifest"]
GroupBy = Literal["stem", "image"]
FeatureLayout = Literal["h5", "clip-retrieval"]
Device = Literal["auto", "cpu", "cuda", "mps"]
Precision = Literal["fp32", "bf16", "fp16"]  # encode
TrainPrecision = Literal["auto", "fp32", "bf16"]  # train (trainer.precision resolves auto)
VectorDtype = Literal["float16", "float32"]
Engine = Literal["local", "ray"]
Modality = Literal["image", "text"]
Features = Literal["image", "text", "image+text"]
Pairing = Literal["as-ingested", "shared"]
Detector = Literal["mlp", "knn"]
InputNorm = Literal["l2", "raw"]
Split = Literal["train", "val", "test"]
Scheduler = Literal["fifo", "asha"]
Experiment = Literal["table1", "table2", "generalization", "robustness"]
IndexKind = Literal["auto", "flat", "ivf", "ivf-sq8", "ivf-pq", "hnsw"]
SqlFormat = Literal["table", "csv", "json", "parquet"]
LandscapeDims = Literal[1, 2]
Decision = Literal["real", "generated", "none"]  # `conflicts resolve --label`: none uses a sample as neither
