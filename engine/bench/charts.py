"""PNG charts for the benchmark commands, drawn off-screen.

matplotlib is imported lazily and pinned to the Agg backend: benchmarks run on headless
GPU machines, and importing the engine must not pay for (or need) a plotting stack. It is an
optional extra (`pip install 'ahead[charts]'`); without it `harness.write_chart` skips the chart.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def bar_chart(path: str | Path, values: dict[str, float], title: str, ylabel: str) -> Path:
    """One bar per label, its value written on top (tok/s per method)."""
    plt = _pyplot()
    labels = list(values)
    width = max(4.0, 1.3 * len(labels) + 1)
    fig, ax = plt.subplots(figsize=(width, 3.6))
    bars = ax.bar(labels, [values[k] for k in labels], color="#4c72b0")
    ax.bar_label(bars, labels=[_short(values[k]) for k in labels], padding=2, fontsize=8)
    ax.set_title("\n".join(textwrap.wrap(title, int(width * 11))), fontsize=10)  # ~11 characters an inch
    ax.set_ylabel(ylabel)
    ax.margins(y=0.15)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def heatmaps(
    path: str | Path,
    panels: dict[str, tuple[list[str], list[str], list[list[float]]]],
    title: str,
    value_label: str,
    row_name: str = "",
    col_name: str = "",
) -> Path:
    """One heatmap per panel: {panel title: (row labels, column labels, values[row][col])}.

    Missing cells are NaN and left blank; all panels share one colour scale so they compare.
    """
    plt = _pyplot()
    finite = [v for _, _, grid in panels.values() for row in grid for v in row if not math.isnan(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 1.2, 3.8), squeeze=False,
                             layout="constrained")
    image = None
    for ax, (name, (rows, cols, grid)) in zip(axes[0], panels.items(), strict=True):
        image = ax.imshow(grid, cmap="viridis", vmin=lo, vmax=hi, aspect="auto", origin="lower")
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(col_name)
        ax.set_ylabel(row_name)
        for r, row in enumerate(grid):
            for c, v in enumerate(row):
                if not math.isnan(v):
                    bright = hi > lo and (v - lo) / (hi - lo) > 0.6  # viridis turns yellow at the top
                    ax.text(c, r, _short(v), ha="center", va="center", fontsize=8, color="k" if bright else "w")
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), label=value_label)
    fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
