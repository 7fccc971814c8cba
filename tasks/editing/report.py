"""Editing results for people: each setting's CounterFact scores beside the unedited model's, as metrics (MEMIT's
with step = number of edits, so MLflow draws the degradation curve), a figure and a markdown table."""

from __future__ import annotations

import json
from dataclasses import asdict

from lensflow.tasks.core import tracking
from lensflow.tasks.core.plots import layer_curves
from lensflow.tasks.editing.pipeline import EditRun
from lensflow.tasks.editing.scores import SCORES


def table(model: str, runs: list[EditRun], layer_source: str) -> str:
    lines = [f"# Fact editing: {model}", "",
             (f"ROME layer from {layer_source}. Scores are fractions in [0, 1]: edited (unedited model on the same "
              "requests)."), "", "| method | edits | layers | " + " | ".join(SCORES) + " |",
             "|---|---|---|" + "---|" * len(SCORES)]
    for r in runs:
        cells = [f"{getattr(r.edited, s):.3f} ({getattr(r.unedited, s):.3f})" for s in SCORES]
        lines.append(f"| {r.method.upper()} | {r.n_edits} | {','.join(map(str, r.layers))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def log_results(run: tracking.RunRef, model: str, runs: list[EditRun], layer_source: str) -> str:
    for r in runs:
        step = r.n_edits if r.method == "memit" else None
        tracking.log_metrics(run, {f"edit.{r.method}.{s}": getattr(r.edited, s) for s in SCORES}, step=step)
        tracking.log_metrics(run, {f"edit.{r.method}.unedited.{s}": getattr(r.unedited, s) for s in SCORES}, step=step)
    tracking.log_metrics(run, {"edit.rome.layer": next((r.layers[0] for r in runs if r.method == "rome"), -1)})
    memit = [r for r in runs if r.method == "memit"]
    if memit:
        panels = {"MEMIT edited": {s: {r.n_edits: getattr(r.edited, s) for r in memit} for s in SCORES},
                  "unedited": {s: {r.n_edits: getattr(r.unedited, s) for r in memit} for s in SCORES}}
        fig = layer_curves(panels, "score", f"{model}: MEMIT scores by number of edits")
        for ax in fig.axes:
            ax.set_xscale("log")
            ax.set_xlabel("edits at once")
        tracking.log_figure(run, fig, "plots/edit_memit_sizes.png")
    tracking.log_text(run, json.dumps([asdict(r) for r in runs]), "edit/results.json")
    text = table(model, runs, layer_source)
    tracking.log_text(run, text, "edit/summary.md")
    return text
