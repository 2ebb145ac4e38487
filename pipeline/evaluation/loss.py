"""A run's objective on a fixed evaluation set: the loss recorded with the run, and the centre of its
loss landscape (`pipeline landscape`) are the same number."""

from __future__ import annotations

import torch

from pipeline.choices import Features, InputNorm
from pipeline.errors import PipelineError
from pipeline.features.loader import FeatureLoader, LoaderConfig
from pipeline.features.view import FeatureTable
from trainer.fit import FitConfig

EVAL_ROWS = 2048  # the fixed evaluation set: the first rows of the val split in table order


def evaluation_set(table: FeatureTable, features: Features,
                   input_norm: InputNorm = "l2") -> tuple[torch.Tensor, torch.Tensor, str]:
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
