"""Shared matplotlib helpers for the experiment scripts (Agg backend: no display needed).

Every helper takes plain numpy data and a path, writes one PNG and returns the path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average of `values` (the first points average what exists so far)."""
    v = np.asarray(values, np.float64)
    if window <= 1 or v.size == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, v.size + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def curves(series: Mapping[str, Sequence[float]], path: str, *, title: str, ylabel: str, xlabel: str = "step",
           window: int = 1, logy: bool = False, raw_alpha: float = 0.2) -> str:
    """One line per arm: the raw curve faint, its `window`-step moving average solid."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, ys) in enumerate(series.items()):
        ys = np.asarray(ys, np.float64)
        xs = np.arange(1, ys.size + 1)
        color = COLORS[i % len(COLORS)]
        if window > 1:
            ax.plot(xs, ys, color=color, alpha=raw_alpha, linewidth=0.8)
        ax.plot(xs, smooth(ys, window), color=color, linewidth=1.6, label=name)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel + (f" ({window}-step moving avg.)" if window > 1 else ""))
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def zoom_ylim_to_tail(path_series: Mapping[str, Sequence[float]], frac: float = 0.5) -> tuple[float, float]:
    """y-limits covering the last `frac` of every series (to zoom on the converged part of loss curves)."""
    tails = np.concatenate([np.asarray(v)[int(len(v) * (1 - frac)):] for v in path_series.values()])
    lo, hi = float(np.min(tails)), float(np.max(tails))
    pad = 0.05 * (hi - lo + 1e-9)
    return lo - pad, hi + pad


def curves_with_zoom(series: Mapping[str, Sequence[float]], path: str, *, title: str, ylabel: str,
                     window: int = 1, frac: float = 0.5) -> str:
    """Two panels: the whole curves, and the last `frac` of the run zoomed in (moving averages)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    smoothed = {k: smooth(v, window) for k, v in series.items()}
    for ax, zoom in zip(axes, (False, True), strict=True):
        for i, (name, ys) in enumerate(series.items()):
            ys = np.asarray(ys, np.float64)
            xs = np.arange(1, ys.size + 1)
            color = COLORS[i % len(COLORS)]
            start = int(ys.size * (1 - frac)) if zoom else 0
            if window > 1:
                ax.plot(xs[start:], ys[start:], color=color, alpha=0.2, linewidth=0.8)
            ax.plot(xs[start:], smoothed[name][start:], color=color, linewidth=1.6, label=name)
        if zoom:
            ax.set_ylim(*zoom_ylim_to_tail(smoothed, frac))
        ax.set(title=title + (" (last part, zoomed)" if zoom else ""), xlabel="step",
               ylabel=ylabel + (f" ({window}-step moving avg.)" if window > 1 else ""))
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def heatmaps(panels: Mapping[str, np.ndarray], path: str, *, suptitle: str, xlabel: str, ylabel: str,
             cbar_label: str, vmax: float | None = None, ncols: int | None = None,
             ylabels: Mapping[str, str] | None = None, xlabels: Mapping[str, str] | None = None,
             xstarts: Mapping[str, int] | None = None) -> str:
    """Side-by-side heatmaps (rows = y, cols = x) on a shared colour scale; panel name → 2-D array.

    Optional per-panel x/y labels, and the x value of the first column (default 0, e.g. 1 for steps)."""
    names = list(panels)
    ncols = ncols or len(names)
    nrows = -(-len(names) // ncols)
    vmax = vmax if vmax is not None else max(float(np.max(a)) for a in panels.values())
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False, layout="constrained")
    image = None
    for ax, name in zip(axes.flat, names, strict=False):
        a = np.asarray(panels[name])
        x0 = (xstarts or {}).get(name, 0)
        image = ax.imshow(a, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=vmax,
                          origin="upper", extent=(x0 - 0.5, x0 + a.shape[1] - 0.5, a.shape[0] - 0.5, -0.5))
        ax.set(title=name, xlabel=(xlabels or {}).get(name, xlabel), ylabel=(ylabels or {}).get(name, ylabel))
        if a.shape[0] <= 8:
            ax.set_yticks(range(a.shape[0]))
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(suptitle)
    fig.colorbar(image, ax=axes, label=cbar_label, shrink=0.9)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def bars(groups: Mapping[str, Mapping[str, float]], path: str, *, title: str, ylabel: str) -> str:
    """Grouped bar chart: group (x tick) → {bar name → value}."""
    names = list(dict.fromkeys(k for g in groups.values() for k in g))
    x = np.arange(len(groups))
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(groups)), 4.2))
    for i, name in enumerate(names):
        vals = [groups[g].get(name, np.nan) for g in groups]
        rects = ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, label=name, color=COLORS[i % len(COLORS)])
        ax.bar_label(rects, fmt="%.0f", fontsize=8)
    ax.set_xticks(x, list(groups))
    ax.set(title=title, ylabel=ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table; floats printed with 4 significant decimals."""
    def cell(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
