"""PNG plots of a training history (the rows metrics.csv holds): loss, validation accuracies, learning rate.

Redrawn after every epoch, so cheap: matplotlib's object API on an Agg canvas (no pyplot state), the lr curve
thinned to ``_MAX_LR_POINTS``, every PNG replaced atomically.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Official EPIC-100 metric names per curve; top-1 solid, top-5 dashed, one colour per task.
_ACCURACY_CURVES = (("verb", "tab:blue"), ("noun", "tab:orange"), ("action", "tab:green"))
_MAX_LR_POINTS = 2000  # a long run has tens of thousands of steps; 2,000 points draw the same curve


def plot_training(history: Sequence[Mapping[str, float]], out_dir: str | Path, *,
                  lr_curve: tuple[Sequence[float], Sequence[float]], title: str = "") -> list[Path]:
    """Write ``loss.png``, ``accuracy.png`` (when there was validation) and ``lr.png`` into ``out_dir``.
    ``history``: one metrics row per epoch; ``lr_curve``: (x in epochs, lr) of every optimiser step."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = f" — {title}" if title else ""
    written = [_save(_loss_figure(history, suffix), out_dir / "loss.png")]
    if _has(history, "all_action_accuracy_at_1"):
        written.append(_save(_accuracy_figure(history, suffix), out_dir / "accuracy.png"))
    written.append(_save(_lr_figure(lr_curve, suffix), out_dir / "lr.png"))
    return written


def _loss_figure(history: Sequence[Mapping[str, float]], suffix: str):
    epochs = [row["epoch"] for row in history]
    fig, ax = _figure((7, 4.5))
    ax.plot(epochs, [row["train_loss"] for row in history], marker="o", ms=3, label="train (CutMix, smoothed)")
    if _has(history, "val_loss"):
        ax.plot(epochs, [row.get("val_loss", math.nan) for row in history], marker="o", ms=3, label="validation")
    ax.set(xlabel="epoch", ylabel="loss (verb + noun cross-entropy)", title=f"Loss{suffix}")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _accuracy_figure(history: Sequence[Mapping[str, float]], suffix: str):
    """Validation top-1 (solid) and top-5 (dashed) per task, and the best epoch by action top-1."""
    epochs = [row["epoch"] for row in history]
    fig, ax = _figure((7, 4.5))
    for task, colour in _ACCURACY_CURVES:
        for k, style in ((1, "-"), (5, "--")):
            name = f"all_{task}_accuracy_at_{k}"
            if _has(history, name):
                values = [row.get(name, math.nan) for row in history]
                ax.plot(epochs, values, style, color=colour, marker="o", ms=3, label=f"{task} top-{k}")
    best = max(history, key=lambda row: row.get("all_action_accuracy_at_1", -1.0))
    ax.axvline(best["epoch"], color="grey", lw=0.8, ls=":", label=f"best epoch {best['epoch']}")
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title=f"Validation accuracy{suffix}")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(ncol=2, fontsize="small")
    return fig


def _lr_figure(lr_curve: tuple[Sequence[float], Sequence[float]], suffix: str):
    """The lr of every optimiser step, thinned to ``_MAX_LR_POINTS``."""
    fig, ax = _figure((7, 3.5))
    every = max(1, -(-len(lr_curve[0]) // _MAX_LR_POINTS))  # keep every n-th step, and the last one
    keep = list(range(0, len(lr_curve[0]), every))
    if keep and keep[-1] != len(lr_curve[0]) - 1:
        keep.append(len(lr_curve[0]) - 1)
    ax.plot([lr_curve[0][i] for i in keep], [lr_curve[1][i] for i in keep], lw=1.2)
    ax.set(xlabel="epoch (per optimiser step)", ylabel="learning rate",
           title=f"Learning rate (warm-up, then cosine){suffix}")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.grid(alpha=0.3)
    return fig


def _has(history: Sequence[Mapping[str, float]], name: str) -> bool:
    return any(name in row for row in history)


def _figure(size: tuple[float, float]):
    """A figure on its own Agg canvas (no pyplot: no global state, no display, nothing to close)."""
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig, path: Path) -> Path:
    """Write the PNG next to ``path`` and rename it over ``path``: readers never see a half-written plot."""
    fig.tight_layout()
    partial = path.with_name(f".{path.name}.partial")
    fig.savefig(partial, dpi=110, format="png")
    partial.replace(path)
    return path
