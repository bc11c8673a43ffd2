"""A comparison of variants (backbones, heads, ...) trained and evaluated the same way: one row per variant, one
table (markdown and JSON) and one bar chart of the official top-1 metrics.

A recipe runs each variant, then hands ``write_comparison`` one ``Row`` each: the variant's ``evaluate`` metrics
and what else it wants shown (feature width, extraction rows/s, cache size, parameters, ...). Used by
pipelines/compare_backbones.py and epicfeat.temporal.compare (pipelines/compare_heads.sh).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from epicfeat.files import atomic_write_text

#: (column, key of evaluate's metrics): overall, tail and unseen top-1 of the three tasks, in percent.
TOP1_COLUMNS = tuple(
    (f"{prefix}{task}@1", f"{key_prefix}{task}_accuracy_at_1")
    for prefix, key_prefix in (("", "all_"), ("tail ", "tail_"), ("unseen ", "unseen_"))
    for task in ("verb", "noun", "action")
)


@dataclass(frozen=True)
class Row:
    name: str  # the variant, e.g. "timm:convnext_tiny"
    metrics: dict[str, float]  # evaluate's metrics of the variant's model (percent)
    extra: dict[str, str | float | int] = field(default_factory=dict)  # further columns, in order


def write_comparison(rows: list[Row], out: Path, *, title: str, note: str = "", cost: str | None = None) -> Path:
    """Write ``comparison.md``, ``comparison.json`` (every metric of each row) and ``comparison.png`` into ``out``;
    print the table and return the markdown's path. ``note`` is printed under the table (e.g. that random weights
    rank nothing); ``cost`` names an extra column the chart shows beside the accuracies (e.g. epoch seconds)."""
    out.mkdir(parents=True, exist_ok=True)
    extra_columns = list(dict.fromkeys(k for row in rows for k in row.extra))
    header = ["variant", *[c for c, _ in TOP1_COLUMNS], *extra_columns]
    lines = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    for row in rows:
        cells = [row.name, *[_cell(row.metrics.get(key)) for _, key in TOP1_COLUMNS],
                 *[_cell(row.extra.get(k)) for k in extra_columns]]
        lines.append(f"| {' | '.join(cells)} |")
    markdown = "\n".join([f"### {title}", "", *lines, *([""] + [note] if note else [])]) + "\n"
    atomic_write_text(out / "comparison.md", markdown)
    atomic_write_text(out / "comparison.json", json.dumps(
        [{"variant": r.name, "metrics": {k: None if math.isnan(v) else v for k, v in r.metrics.items()}, **r.extra}
         for r in rows], indent=2, default=str))
    _plot(rows, out / "comparison.png", title, cost)
    print(markdown)
    return out / "comparison.md"


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 1 or value == 0 else f"{value:.2f}"
    return str(value)


def _plot(rows: list[Row], path: Path, title: str, cost: str | None) -> None:
    """Grouped bars: verb, noun and action top-1 (overall) per variant; beside them the ``cost`` column's bars, what
    each variant buys and what it costs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [(c, key) for c, key in TOP1_COLUMNS[:3]]
    width = 0.8 / len(tasks)
    fig, axes = plt.subplots(1, 2 if cost else 1, figsize=(max(5.0, 1.6 * len(rows) + 2) + 3 * bool(cost), 3.6),
                             squeeze=False, width_ratios=[3, 1] if cost else None)
    ax, *side = axes[0]
    for i, (label, key) in enumerate(tasks):
        values = [row.metrics.get(key, float("nan")) for row in rows]
        ax.bar([x + (i - 1) * width for x in range(len(rows))], values, width, label=label)
    ax.set_xticks(range(len(rows)), [row.name for row in rows], rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    for panel in side:  # the cost beside the accuracies
        panel.bar(range(len(rows)), [row.extra.get(cost, float("nan")) for row in rows], color="grey")
        panel.set_xticks(range(len(rows)), [row.name for row in rows], rotation=15, ha="right", fontsize=8)
        panel.set_ylabel(cost)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
