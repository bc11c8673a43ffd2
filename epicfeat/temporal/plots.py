"""End-of-run PNG plots of a training history: loss, validation accuracies and the learning rate.

Matplotlib runs on the Agg backend (no display needed on a cluster node). The inputs are the rows that
``metrics.csv`` holds, so the same plots can be redrawn from a CSV later.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

# Official EPIC-100 metric names per curve; top-1 solid, top-5 dashed, one colour per task.
_ACCURACY_CURVES = (
    ("verb", "tab:blue"),
    ("noun", "tab:orange"),
    ("action", "tab:green"),
)


def plot_training(
    history: Sequence[Mapping[str, float]],
    out_dir: str | Path,
    *,
    lr_curve: tuple[Sequence[float], Sequence[float]] | None = None,
    title: str = "",
) -> list[Path]:
    """Write ``loss.png``, ``accuracy.png`` (when there was validation) and ``lr.png`` into ``out_dir``.

    ``history`` holds one row per epoch (``epoch``, ``train_loss``, optional ``val_loss`` and official metric
    names such as ``all_action_accuracy_at_1``). ``lr_curve`` is (x in epochs, lr) for every optimiser step; without
    it the per-epoch ``lr`` column is drawn.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    epochs = [row["epoch"] for row in history]
    written: list[Path] = []
    suffix = f" — {title}" if title else ""

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(epochs, [row["train_loss"] for row in history], marker="o", ms=3, label="train (CutMix, smoothed)")
    if _has(history, "val_loss"):
        ax.plot(epochs, [row.get("val_loss", math.nan) for row in history], marker="o", ms=3, label="validation")
    ax.set(xlabel="epoch", ylabel="loss (verb + noun cross-entropy)", title=f"Loss{suffix}")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, out_dir / "loss.png"))

    if _has(history, "all_action_accuracy_at_1"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
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
        written.append(_save(fig, out_dir / "accuracy.png"))

    fig, ax = plt.subplots(figsize=(7, 3.5))
    if lr_curve is not None:
        ax.plot(lr_curve[0], lr_curve[1], lw=1.2)
        ax.set_xlabel("epoch (per optimiser step)")
    else:
        ax.plot(epochs, [row["lr"] for row in history], marker="o", ms=3)
        ax.set_xlabel("epoch")
    ax.set(ylabel="learning rate", title=f"Learning rate (warm-up, then cosine){suffix}")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.grid(alpha=0.3)
    written.append(_save(fig, out_dir / "lr.png"))
    return written


def _has(history: Sequence[Mapping[str, float]], name: str) -> bool:
    return any(name in row for row in history)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
