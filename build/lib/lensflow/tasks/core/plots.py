"""Figures people would rather look at than read: per-layer curves, head heatmaps, lens grids (PNG + HTML)."""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
from pathlib import Path  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def layer_curves(
    panels: Mapping[str, Mapping[str, Sequence[float] | Mapping[int, float]]],
    ylabel: str,
    title: str = "",
) -> Figure:
    """One panel per key of `panels`, one line per series; a series is a list (x = 0..) or {layer: value}."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False, sharey=True)
    for ax, (panel, series) in zip(axes[0], panels.items()):
        for name, ys in series.items():
            xs, vals = (list(ys.keys()), list(ys.values())) if isinstance(ys, Mapping) else (list(range(len(ys))), list(ys))
            ax.plot(xs, vals, marker="o", markersize=3, label=name)
        ax.set_title(panel)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def heatmap(matrix: np.ndarray, title: str, xlabel: str = "head", ylabel: str = "layer", cmap: str = "RdBu_r") -> Figure:
    """Layer x head (or any 2-D) heatmap, centred on zero when the values change sign."""
    m = np.asarray(matrix, dtype=float)
    lim = np.nanmax(np.abs(m)) or 1.0
    kw = dict(vmin=-lim, vmax=lim) if np.nanmin(m) < 0 < np.nanmax(m) else {}
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * m.shape[1], 1.0 + 0.22 * m.shape[0]))
    im = ax.imshow(m, aspect="auto", cmap=cmap, origin="lower", **kw)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def lens_grid(
    tokens: Sequence[str],
    layers: Sequence[int],
    cells: Sequence[Sequence[str]],
    probs: np.ndarray,
    title: str,
) -> tuple[Figure, str]:
    """Layer x token grid: cells[i][j] is the text shown for layer layers[i] at input token j,
    probs[i, j] in [0, 1] colours it. Returns the PNG figure and a standalone HTML page."""
    p = np.asarray(probs, dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 1.3 * len(tokens), 0.8 + 0.32 * len(layers)))
    ax.imshow(p, aspect="auto", cmap="Blues", vmin=0, vmax=1, origin="lower")
    for i in range(len(layers)):
        for j in range(len(tokens)):
            ax.text(j, i, cells[i][j][:14], ha="center", va="center", fontsize=6.5,
                    color="white" if p[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(tokens)), [t[:12] for t in tokens], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), [str(l) for l in layers], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()

    rows = []
    for i in reversed(range(len(layers))):
        tds = "".join(
            f'<td style="background:rgba(31,119,180,{p[i, j]:.2f})" title="{p[i, j]:.3f}">{html.escape(cells[i][j])}</td>'
            for j in range(len(tokens))
        )
        rows.append(f"<tr><th>{layers[i]}</th>{tds}</tr>")
    head = "".join(f"<th>{html.escape(t)}</th>" for t in tokens)
    page = (
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>table{border-collapse:collapse;font:12px monospace}td,th{border:1px solid #ccc;padding:3px 6px;"
        "white-space:pre}</style>"
        f"<h3>{html.escape(title)}</h3><table><tr><th>layer</th>{head}</tr>{''.join(rows)}</table>"
    )
    return fig, page


def save_grid(fig: Figure, page: str, name: str, prompt: str, out_dir: str | Path = ".lensflow/grids") -> dict[str, Path]:
    """Write a lens grid as PNG and HTML under out_dir, named after the lens and the prompt; closes the figure."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:40] or "prompt"
    paths = {"png": out / f"{name}_{slug}.png", "html": out / f"{name}_{slug}.html"}
    fig.savefig(paths["png"], dpi=130)
    paths["html"].write_text(page)
    plt.close(fig)
    return paths


def labelled_heatmap(matrix: np.ndarray, row_labels: Sequence[str], title: str, xlabel: str = "layer",
                     cmap: str = "Purples", colorbar: str = "", vmin: float | None = None) -> Figure:
    """Rows named (tokens, token groups) top to bottom, columns = layers 0..; NaN cells (a row that does not
    apply) are left blank."""
    m = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(2.2 + 0.16 * m.shape[1], 1.0 + 0.3 * m.shape[0]))
    im = ax.imshow(np.ma.masked_invalid(m), aspect="auto", cmap=cmap, vmin=vmin, interpolation="nearest")
    ax.set_yticks(range(len(row_labels)), [str(r)[:24] for r in row_labels], fontsize=8)
    step = max(1, m.shape[1] // 10)
    ax.set_xticks(range(0, m.shape[1], step))
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    bar = fig.colorbar(im, ax=ax)
    bar.set_label(colorbar)
    fig.tight_layout()
    return fig
