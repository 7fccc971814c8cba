"""What a sweep's run shows: one row per point (its settings and headline), the best point, and the headline's
per-layer curve of every point on one figure."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lensflow.tasks.core import tracking
from lensflow.tasks.core.experiment import Headline
from lensflow.tasks.core.metric_names import metric_key, section
from lensflow.tasks.core.plots import layer_curves
from lensflow.tasks.sweep.grid import Sweep, point_label


@dataclass(frozen=True)
class PointResult:
    point: dict
    run_id: str
    curve: dict[int, float]  # headline by step (layer); one entry for a scalar headline


def headline_curve(ref: tracking.RunRef, metric: str) -> dict[int, float]:
    """The headline by step, under its logged key; a point run of an earlier metrics schema (a rerun reuses it) under
    its key then: `<section>/<name>` (schema 2) or the bare name (schema 1)."""
    for key in dict.fromkeys((metric_key(metric), f"{section(metric)}/{metric}", metric)):
        if history := ref.client.get_metric_history(ref.run_id, key):
            return {int(m.step): float(m.value) for m in history if np.isfinite(m.value)}
    return {}


def table(sweep: Sweep, results: list[PointResult], head: Headline) -> str:
    keys = list(sweep.grid)
    rows = [f"| {' | '.join(keys)} | {head.metric} ({head.reduce}, {head.direction}) | at step | run |",
            "|---" * (len(keys) + 3) + "|"]
    for r in results:
        step, value = head.score(r.curve)
        rows.append(f"| {' | '.join(str(r.point[k]) for k in keys)} | {value:.4g} | {'' if step is None else step} | "
                    f"{r.run_id} |")
    return "\n".join(rows) + "\n"


def log_summary(parent: tracking.RunRef, sweep: Sweep, results: list[PointResult], head: Headline) -> PointResult | None:
    """The summary table (markdown, and an MLflow table for the UI's artifact view), the best point and the
    comparison figure on the sweep's run; returns the best point."""
    scored = [r for r in results if r.curve]
    tracking.log_text(parent, table(sweep, results, head), "sweep_summary.md")
    columns = {k: [str(r.point[k]) for r in results] for k in sweep.grid}
    columns |= {head.metric: [head.score(r.curve)[1] for r in results], "run_id": [r.run_id for r in results]}
    parent.client.log_table(parent.run_id, data=columns, artifact_file="sweep_summary.json")
    tracking.log_metrics(parent, {"sweep.points": len(results), "sweep.points_scored": len(scored)})
    if not scored:
        return None
    sign = 1 if head.direction == "max" else -1
    best = max(scored, key=lambda r: sign * head.score(r.curve)[1])
    tracking.set_tags(parent, {"lensflow.sweep.best_point": point_label(best.point),
                               "lensflow.sweep.best_run": best.run_id})
    tracking.log_metrics(parent, {f"sweep.best.{head.metric}": head.score(best.curve)[1]})
    if any(len(r.curve) > 1 for r in scored):
        fig = layer_curves({head.metric: {point_label(r.point): r.curve for r in scored}}, head.metric,
                           f"sweep over {', '.join(sweep.grid)}")
        tracking.log_figure(parent, fig, "plots/sweep_comparison.png")
    return best
