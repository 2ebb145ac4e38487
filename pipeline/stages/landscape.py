"""`pipeline landscape`: the loss around a run's trained weights (the paper's Figure 3).

Following Li et al. (2018), "Visualizing the Loss Landscape of Neural Nets": random Gaussian
directions, filter-normalised (each row of a weight matrix, i.e. one unit's filter, rescaled to
the norm of that row of the trained weights; biases and BatchNorm parameters left at zero), and
the run's own objective evaluated at θ + a·d₁ (+ b·d₂) on the run's fixed evaluation set
(`train.evaluation_set`), weights in eval mode. At a = b = 0 this is the run's recorded
`eval_loss`. Two runs share the same random draw (seed), each normalised to its own weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.choices import LandscapeDims
from pipeline.config import Validated, at_least
from pipeline.errors import PipelineError
from pipeline.evaluation.loss import evaluation_loss, evaluation_set
from pipeline.features.view import feature_table
from pipeline.present.figures import DPI, FIG_SIZE, figure, save_png
from pipeline.present.html import index_reports
from pipeline.reporting import Reporter, Silent
from pipeline.runs.record import load_run
from pipeline.store.atomic import write_text
from pipeline.store.layout import Store
from pipeline.store.outputs import check_output


@dataclass(frozen=True)
class LandscapeConfig(Validated):
    store: Store
    runs: tuple[str, ...]
    dims: LandscapeDims = 1
    steps: int | None = None  # points per axis; default 41 (1-D) or 17 (2-D)
    span: float = 1.0  # coordinates run over [-span, span]
    seed: int = 0
    output: Path | None = None

    def check(self) -> None:
        if not 1 <= len(self.runs) <= 2:
            raise PipelineError("Give one or two --run options.")
        at_least(self, "steps", 3)
        if self.span <= 0:
            raise PipelineError("--span must be positive.")
        if self.output is not None:  # the PNG and the JSON of its numbers beside it
            check_output(self.store, self.output, "file", own="reports", beside=[self.output.with_suffix(".json")])


@dataclass
class RunSurface:
    run_id: str
    label: str
    losses: np.ndarray  # [steps] or [steps, steps]
    centre_loss: float
    recorded_eval_loss: float | None


@dataclass
class LandscapeResult:
    coords: np.ndarray
    surfaces: list[RunSurface]
    png: Path
    data: Path


def filter_normalised_direction(model: torch.nn.Module, generator: torch.Generator) -> list[torch.Tensor]:
    """One random direction shaped like the parameters, filter-normalised (Li et al., 2018)."""
    direction = []
    for p in model.parameters():
        d = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        if p.dim() <= 1:
            d.zero_()  # biases and BatchNorm scales/shifts: not perturbed
        else:
            rows_p = p.detach().reshape(p.shape[0], -1).norm(dim=1)
            rows_d = d.reshape(d.shape[0], -1).norm(dim=1).clamp_min(1e-12)
            d = d * (rows_p / rows_d).reshape(-1, *([1] * (p.dim() - 1)))
        direction.append(d)
    return direction


@torch.no_grad()
def surface(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_of: object,
            directions: list[list[torch.Tensor]], coords: np.ndarray, reporter: Reporter | None = None) -> np.ndarray:
    """Loss at θ + Σ cᵢ dᵢ for every point of the grid `coords`^len(directions)."""
    params = list(model.parameters())
    origin = [p.detach().clone() for p in params]
    shape = (len(coords),) * len(directions)
    out = np.zeros(shape)
    try:
        for idx in np.ndindex(*shape):
            for p, o, *ds in zip(params, origin, *directions, strict=True):
                p.copy_(o)
                for c, d in zip((coords[i] for i in idx), ds, strict=True):
                    p.add_(d, alpha=float(c))
            out[idx] = loss_of(model, x, y)  # type: ignore[operator]
            if reporter:
                reporter.advance("landscape", 1)
    finally:
        for p, o in zip(params, origin, strict=True):
            p.copy_(o)
    return out


def run(config: LandscapeConfig, reporter: Reporter | None = None) -> LandscapeResult:
    steps = config.steps or (41 if config.dims == 1 else 17)
    coords = np.linspace(-config.span, config.span, steps)
    surfaces = []
    random_weights = False
    reporter = reporter or Silent()
    reporter.start("landscape", len(config.runs) * steps**config.dims, "points")
    for run_id in config.runs:
        run_config, model, metrics = load_run(config.store, run_id)
        table = feature_table(config.store, metrics.model_key, run_config.pairing, reporter=reporter)
        x, y, _ = evaluation_set(table, run_config.features, run_config.input_norm)
        gen = torch.Generator().manual_seed(config.seed)
        directions = [filter_normalised_direction(model, gen) for _ in range(config.dims)]

        def loss_of(m: torch.nn.Module, xs: torch.Tensor, ys: torch.Tensor, fc=run_config.fit) -> float:
            return evaluation_loss(m, xs, ys, fc)

        losses = surface(model, x, y, loss_of, directions, coords, reporter)
        centre = float(losses[(steps // 2,) * config.dims])
        label = run_config.name or ("SAM" if run_config.fit.sam else "no SAM")
        surfaces.append(RunSurface(run_id, f"{label} ({run_id[-13:]})", losses, centre, metrics.eval_loss))
        random_weights = random_weights or bool(metrics.random_weights)
    name = "landscape-" + "-vs-".join(r[-13:] for r in config.runs) + f"-{config.dims}d"
    png = config.output or config.store.root / "reports" / f"{name}.png"
    _plot(png, coords, surfaces, config.dims, random_weights)
    data = write_text(png.with_suffix(".json"), json.dumps({
        "runs": list(config.runs), "dims": config.dims, "coords": coords.tolist(), "seed": config.seed,
        "losses": {s.run_id: s.losses.tolist() for s in surfaces},
        "method": "filter-normalised random directions (Li et al. 2018); biases/BN not perturbed; "
                  "the run's objective on its fixed evaluation set, eval mode",
    }, indent=1))
    index_reports(config.store.root / "reports", png, f"landscape ({config.dims}-D)", ", ".join(config.runs))
    return LandscapeResult(coords, surfaces, png, data)


def _plot(path: Path, coords: np.ndarray, surfaces: list[RunSurface], dims: int, random_weights: bool) -> None:
    if dims == 1:
        fig, ax = figure("Loss along a filter-normalised random direction")
        for s in surfaces:
            ax.plot(coords, s.losses, lw=1.5, label=s.label)
        ax.set_xlabel("step along the direction")
        ax.set_ylabel("objective on the evaluation set")
        ax.legend(fontsize=7)
        save_png(fig, path, random_weights)
        return
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIG_SIZE if len(surfaces) == 1 else (12.8, 4.8), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(surfaces), squeeze=False)
    low, high = min(s.losses.min() for s in surfaces), max(s.losses.max() for s in surfaces)
    # geometric levels: the basin near the trained weights gets as many lines as the walls
    levels = np.geomspace(low, high, 16) if low > 0 else np.linspace(low, high, 16)
    for ax, s in zip(axes[0], surfaces, strict=True):
        filled = ax.contourf(coords, coords, s.losses.T, levels=levels, cmap="viridis")
        cs = ax.contour(coords, coords, s.losses.T, levels=levels, colors="white", linewidths=0.5)
        ax.clabel(cs, levels[::3], fontsize=6, fmt="%.3g")
        ax.plot(0, 0, "r+")
        ax.set_title(s.label, fontsize=9)
        ax.set_xlabel("direction 1")
        ax.set_ylabel("direction 2")
    fig.colorbar(filled, ax=axes[0].tolist(), label="objective on the evaluation set", shrink=0.9)
    save_png(fig, path, random_weights)
