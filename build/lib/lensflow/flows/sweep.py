"""Flow `sweep`: one flow over a grid of config overrides, each point a nested MLflow run under the sweep's run.

Points run as Prefect subflows here, or as runs of the flow's deployment on a work pool (`deployment`), at most
`max_parallel` at once. A rerun of the same sweep runs only the points without a FINISHED run."""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor

from prefect import flow

from lensflow.tasks.core import tracking
from lensflow.tasks.core.experiment import Headline
from lensflow.tasks.core.tracking import SWEEP_ID
from lensflow.tasks.registry import experiment, load_config
from lensflow.tasks.sweep.grid import Sweep, point_key, point_label, point_overrides
from lensflow.tasks.sweep.report import PointResult, headline_curve, log_summary


def _run_point(sweep: Sweep, overrides: list[str]) -> None:
    if sweep.deployment:
        from prefect.deployments import run_deployment

        run = run_deployment(sweep.deployment, parameters={"config": sweep.config, "overrides": overrides},
                             as_subflow=True, timeout=None)
        if not run.state.is_completed():
            raise RuntimeError(f"sweep point run {run.name} ended {run.state.name}")
        return
    experiment(sweep.flow).flow_function()(config=sweep.config, overrides=overrides)


@flow(name="sweep", log_prints=True)
def sweep_flow(sweep: dict) -> dict:
    spec = Sweep.model_validate(sweep)
    base = load_config(spec.config, spec.set)
    head = experiment(spec.flow).headline
    with tracking.sweep_run(base, spec.flow, spec.id, {"grid": spec.grid, "set": spec.set,
                                                       "config": spec.config}) as parent:
        best, ran = _run_points(spec, parent, head)
    if best is not None:
        print(f"best point: {point_label(best.point)} ({head.metric} {head.reduce} {head.score(best.curve)[1]:.4g})")
    print(f"MLflow sweep run: {parent.run_id} ({SWEEP_ID}={spec.id})")
    return {"sweep_id": spec.id, "run_id": parent.run_id, "points": len(spec.points()), "ran": ran,
            "best": point_label(best.point) if best else None}


def _run_points(spec: Sweep, parent: tracking.RunRef, head: Headline):
    points = spec.points()
    done = tracking.finished_children(parent)  # run id -> params
    expected = {point_key(p): load_config(spec.config, [*spec.set, *point_overrides(p)]).flat() for p in points}

    def run_of(point: dict) -> str | None:
        want = expected[point_key(point)]
        return next((rid for rid, params in done.items()
                     if all(params.get(k) == str(want[k]) for k in point)), None)

    todo = [p for p in points if run_of(p) is None]
    print(f"sweep {spec.id}: {len(points)} points, {len(points) - len(todo)} already finished")
    jobs = [[*spec.set, *point_overrides(p), f"tracking.parent_run_id={parent.run_id}"] for p in todo]
    with ThreadPoolExecutor(spec.max_parallel) as pool:  # each point in a copy of this context: nested subflows
        for f in [pool.submit(contextvars.copy_context().run, _run_point, spec, job) for job in jobs]:
            f.result()
    done = tracking.finished_children(parent)
    results = []
    for p in points:
        rid = run_of(p)
        curve = headline_curve(tracking.RunRef(parent.tracking_uri, parent.experiment_id, rid), head.metric) if rid else {}
        results.append(PointResult(p, rid or "", curve))
    return log_summary(parent, spec, results, head), len(todo)
