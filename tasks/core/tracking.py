"""MLflow, in one place: every flow logs its run the same way.

The driver creates the database, the experiment and the run; workers receive a picklable RunRef and log
through MlflowClient (no fluent global state), because concurrent `set_experiment` calls and concurrent
sqlite schema creation are measured to misfile or fail. Metrics go in batches (log_batch is ~50x faster
than one call per metric); per-layer metrics use step = layer so MLflow draws the curve itself.

A flow's run is tagged alive every tracking.heartbeat_s; a run whose process died (kill -9, lost node) is closed as
KILLED by the next flow of the experiment that finds it stale. A server that stops answering surfaces as one
TrackingUnavailable (redacted, one line): stage outputs are in the store, so rerunning the command loses nothing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from lensflow.tasks.core.config import Config, ConfigError, TrackingConf
from lensflow.tasks.core.metric_names import (
    SCHEMA,
    SCHEMA_TAG,
    is_headline,
    lower_is_better,
    metric_key,
)
from lensflow.tasks.core.redact import redact

_BATCH = 900  # log_batch accepts up to 1000 metrics per call
HEARTBEAT = "lensflow.heartbeat"  # unix seconds of the run's last sign of life
HEARTBEAT_S = "lensflow.heartbeat_s"  # the run's own heartbeat period
CLOSED_BY = "lensflow.closed_by"  # on a stale run: which run closed it, and why
SWEEP_ID = "lensflow.sweep_id"  # on a sweep's run and on each of its points' runs
PARENT = "mlflow.parentRunId"  # nests a run under another in the UI (a layer's job, a sweep's point)
MEASURES = "lensflow.measures"  # on a flow's run: what its experiment measures (the experiment's note reads it)
# What MLflow 3.17's UI shows is its "workflow type" (GenAI | Model training): the address's `workflowType` query
# parameter, else the browser's localStorage (`mlflow.workflowType_v1`, written only by the sidebar's switch), else
# GenAI. The experiment kind tag is not consulted while workflow-based navigation is on, which 3.17.2 hard-wires
# (its built UI, mlflow/server/js/build: WorkflowTypeProvider, useExperimentKind, shouldEnableWorkflowBasedNavigation;
# sources: src/common/contexts/WorkflowTypeContext.tsx, src/experiment-tracking/utils/ExperimentKindUtils.tsx,
# src/common/utils/FeatureUtils.ts). No server setting selects it. lensflow prints and links addresses carrying the
# parameter (MLflow's own run links drop it: the switch, clicked once, is what a browser keeps); the tag still says
# what the experiment is (the experiment page's kind selector, and MLflow versions that read it).
WORKFLOW = "workflowType=machine_learning"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# MLflow prints "View run ... at: <tracking URI>" on every set_terminated, credentials included; flow_run prints the
# link itself, redacted. Read at each call, so this holds for Ray workers and Prefect deployments too.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


class TrackingUnavailable(RuntimeError):
    """The MLflow server stopped answering (after MLflow's bounded retries). The message is one redacted line:
    MLflow's own names the URL, credentials included."""


def unreachable(exc: MlflowException) -> str | None:
    """Why the server did not answer (refused, timed out, kept failing), or None when it answered with an error."""
    cause = exc.__cause__ or exc.__context__
    if not isinstance(cause, requests.RequestException) or isinstance(cause, requests.exceptions.InvalidURL):
        return None
    text = str(cause)
    if m := re.search(r"\[Errno -?\d+\][^'\")]*", text):
        return m.group(0).strip()
    if isinstance(cause, requests.Timeout):
        return f"no answer within {os.environ.get('MLFLOW_HTTP_REQUEST_TIMEOUT', '120')} s"
    if m := re.search(r"too many \d+ error responses", text):
        return m.group(0)
    return type(cause).__name__


def outage(exc: BaseException | None) -> TrackingUnavailable | None:
    """The TrackingUnavailable behind exc, if any (through exception chains and Ray's task errors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TrackingUnavailable):
            return getattr(exc, "cause", None) or exc  # a Ray task error's cause is the worker's exception
        exc = exc.__cause__ or exc.__context__
    return None


class _Client:
    """MlflowClient whose calls fail with TrackingUnavailable when the server does not answer."""

    def __init__(self, uri: str):
        self._uri, self._client = uri, MlflowClient(uri)

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except MlflowException as exc:
                reason = unreachable(exc)
                if reason is None:
                    raise
                raise TrackingUnavailable(
                    f"tracking.uri {redact(self._uri)}: the MLflow server stopped answering ({reason}); rerun the "
                    "same command: finished stages are kept under store.root") from None

        return call


@dataclass(frozen=True)
class RunRef:
    tracking_uri: str
    experiment_id: str
    run_id: str

    @property
    def client(self) -> MlflowClient:
        return _Client(self.tracking_uri)  # type: ignore[return-value]  # MlflowClient's methods, guarded


def local_uri(uri: str) -> str:
    """Absolute sqlite paths, so Ray workers (other working directories) open the same database."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri.removeprefix("sqlite:///")).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return uri


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def ui_address(uri: str, experiment: str, run_id: str | None = None) -> str:
    """Where a person opens the experiment's runs (or one run) in MLflow's Model training view: the server's address
    for an http tracking URI, else the `mlflow ui` command for the local database and its default address. The
    address carries `workflowType=machine_learning`, which MLflow 3.17 honours in any browser profile."""
    page = f"#/experiments/{experiment}/runs" + (f"/{run_id}" if run_id else "") + f"?{WORKFLOW}"
    if uri.startswith("http"):
        return f"{redact(uri).rstrip('/')}/{page}"
    return f"`mlflow ui --backend-store-uri {redact(uri)}`, then http://127.0.0.1:5000/{page}"


def experiment_id(uri: str, name: str) -> str:
    client = _Client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if not exp.tags.get("mlflow.experimentKind"):
            for k, v in EXPERIMENT_KIND.items():
                client.set_experiment_tag(exp.experiment_id, k, v)
        return exp.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside the database rather than in ./mlruns of whatever cwd
        artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifacts, tags=EXPERIMENT_KIND)
    except MlflowException:  # a concurrent run created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@contextmanager
def flow_run(conf: Config, flow: str) -> Iterator[RunRef]:
    """One MLflow run per flow run: resolved config as params, git commit and flow as tags; stale runs of the
    experiment closed first, a heartbeat tag while the block runs."""
    uri = local_uri(conf.tracking.uri)
    mlflow.set_tracking_uri(uri)
    client = _Client(uri)
    exp = experiment_id(uri, conf.tracking.experiment)
    tags = {"flow": flow, "mlflow.source.git.commit": _git_commit(), "model.name": conf.model.name,
            HEARTBEAT: f"{time.time():.0f}", HEARTBEAT_S: f"{conf.tracking.heartbeat_s:g}", SCHEMA_TAG: SCHEMA}
    if conf.tracking.parent_run_id:
        tags[PARENT] = conf.tracking.parent_run_id
    try:
        from prefect.runtime import flow_run as prefect_run

        if prefect_run.id:
            tags["prefect.flow_run_id"] = str(prefect_run.id)
    except ImportError:
        pass
    run = client.create_run(exp, run_name=f"{flow}-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
    ref = RunRef(uri, exp, run.info.run_id)
    for stale in close_stale(ref, conf.tracking):
        print(f"MLflow run {stale} closed as KILLED: no heartbeat for over tracking.stale_after_s="
              f"{conf.tracking.stale_after_s:g} s (its process died)")
    params = [Param(k, redact(str(v))[:6000]) for k, v in conf.flat().items()]
    for i in range(0, len(params), 100):
        client.log_batch(ref.run_id, params=params[i : i + 100])
    print(f"MLflow run {ref.run_id} (experiment '{conf.tracking.experiment}'): {ui_address(uri, exp, ref.run_id)}")
    with _terminated(ref), _heartbeat(ref, conf.tracking.heartbeat_s):
        yield ref
        headline = _summarize(ref, flow, conf.model.name)
    try:  # once FINISHED, the run is the latest of its flow on the experiment's landing note
        if headline:
            save_view(uri, exp, flow, headline)
        describe_experiment(uri, exp)
    except (MlflowException, TrackingUnavailable) as exc:  # a convenience: the run itself is complete
        print(f"MLflow: the experiment's description and saved view were not updated: {redact(str(exc))[:200]}")


@contextmanager
def sweep_run(conf: Config, flow: str, sweep_id: str, params: Mapping[str, object]) -> Iterator[RunRef]:
    """The sweep's MLflow run, found again by its sweep id (a rerun reopens it) or created; its points' runs nest
    under it. Alive (heartbeat) while the block runs, so the points' stale-run check leaves it open."""
    uri = local_uri(conf.tracking.uri)
    client = _Client(uri)
    exp = experiment_id(uri, conf.tracking.experiment)
    found = client.search_runs([exp], f"tags.`{SWEEP_ID}` = '{sweep_id}'", max_results=1)
    beat = {HEARTBEAT: f"{time.time():.0f}", HEARTBEAT_S: f"{conf.tracking.heartbeat_s:g}"}
    if found:
        ref = RunRef(uri, exp, found[0].info.run_id)
        client.update_run(ref.run_id, status="RUNNING")
        set_tags(ref, beat)
    else:
        run = client.create_run(exp, run_name=f"sweep-{flow}-{sweep_id[:6]}",
                                tags={"flow": "sweep", "lensflow.sweep_flow": flow, SWEEP_ID: sweep_id,
                                      "mlflow.source.git.commit": _git_commit(), **beat})
        ref = RunRef(uri, exp, run.info.run_id)
        client.log_batch(ref.run_id, params=[Param(k, redact(str(v))[:6000]) for k, v in params.items()])
    print(f"MLflow sweep run {ref.run_id} (experiment '{conf.tracking.experiment}')")
    with _terminated(ref), _heartbeat(ref, conf.tracking.heartbeat_s):
        yield ref


def finished_children(parent: RunRef) -> dict[str, dict[str, str]]:
    """FINISHED runs nested under `parent`: run id -> params."""
    runs = finished_runs(parent.tracking_uri, parent.experiment_id, {PARENT: parent.run_id})
    return {r.info.run_id: r.data.params for r in runs}


def close_stale(ref: RunRef, tc: TrackingConf) -> list[str]:
    """Close the experiment's RUNNING runs that show no sign of life: no heartbeat (else no start) for
    tc.stale_after_s and for 3 of their own heartbeat periods. A nested run lives as long as its parent does, so a
    long per-layer job under a live flow is never closed. Returns the closed runs' ids."""
    client = ref.client
    running = {r.info.run_id: r for r in client.search_runs([ref.experiment_id], "attributes.status = 'RUNNING'",
                                                            max_results=1000)}

    def alive_at(run) -> float:
        tags = run.data.tags
        own = float(tags.get(HEARTBEAT, 0)) or run.info.start_time / 1000
        parent = running.get(tags.get("mlflow.parentRunId", ""))
        return max(own, alive_at(parent)) if parent is not None and parent is not run else own

    def period(run) -> float:
        parent = running.get(run.data.tags.get("mlflow.parentRunId", ""))
        return float(run.data.tags.get(HEARTBEAT_S) or (parent.data.tags.get(HEARTBEAT_S, 0) if parent else 0))

    now, closed = time.time(), []
    for run_id, run in running.items():
        silent = now - alive_at(run)
        if run_id == ref.run_id or silent <= max(tc.stale_after_s, 3 * period(run)):
            continue
        try:
            client.set_tag(run_id, CLOSED_BY, f"run {ref.run_id}: no heartbeat for {silent:.0f} s "
                                              f"(tracking.stale_after_s={tc.stale_after_s:g}); its process died")
            client.set_terminated(run_id, "KILLED", end_time=int(alive_at(run) * 1000))
            closed.append(run_id)
        except MlflowException:  # deleted or closed by another run meanwhile
            continue
    return closed


@contextmanager
def _heartbeat(ref: RunRef, period_s: float) -> Iterator[None]:
    """Tag the run alive every period_s from a daemon thread, so a run whose process dies is recognisably stale."""
    stop = threading.Event()

    def beat() -> None:
        client = ref.client
        while not stop.wait(period_s):
            try:
                client.set_tag(ref.run_id, HEARTBEAT, f"{time.time():.0f}")
            except Exception:  # an outage shows on the flow's own next call, in one line; a beat never fails a run
                pass

    threading.Thread(target=beat, name=f"mlflow-heartbeat-{ref.run_id[:8]}", daemon=True).start()
    try:
        yield
    finally:
        stop.set()


@contextmanager
def _terminated(ref: RunRef) -> Iterator[None]:
    """FINISHED when the block completes, FAILED (KILLED on Ctrl-C) and re-raised when it does not. With the server
    gone the run stays RUNNING and the original error goes on; a later run closes it as stale. While the block runs
    the run is open: `close_open_runs` (the CLI, on SIGINT or SIGTERM) closes it KILLED, and then nothing here
    closes it again."""
    _OPEN[ref.run_id] = ref
    try:
        yield
    except BaseException as exc:
        if _OPEN.pop(ref.run_id, None) is not None and outage(exc) is None:  # a server known gone is not asked again
            try:
                ref.client.set_terminated(ref.run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            except TrackingUnavailable:
                pass
        raise
    if _OPEN.pop(ref.run_id, None) is not None:
        ref.client.set_terminated(ref.run_id, "FINISHED")


_OPEN: dict[str, RunRef] = {}  # runs this process has open, by id


def close_open_runs(status: str = "KILLED") -> list[str]:
    """Close every run this process has open (a flow's, a sweep's): a stopped process's runs are not left RUNNING."""
    closed = []
    for run_id in list(_OPEN):
        if (ref := _OPEN.pop(run_id, None)) is not None:
            try:
                ref.client.set_terminated(run_id, status)
                closed.append(run_id)
            except Exception:  # noqa: BLE001 - stopping: a server that does not answer must not hold the exit up
                pass
    return closed


def tag_model(ref: RunRef, info) -> None:
    """The model identity every stage key includes (info: models.ModelInfo), so runs can be matched to stages."""
    set_tags(ref, {f"model.{k}": v for k, v in asdict(info.id).items() if v is not None})


def log_extraction(ref: RunRef, ex, label: str) -> None:
    """An activation store's URI and this run's extraction counters, the same way for every flow that extracts."""
    set_tags(ref, {f"store.{label}": ex.url})
    log_metrics(ref, {f"extract.{label}.{k}": v for k, v in ex.metrics().items()})


def set_tags(ref: RunRef, tags: Mapping[str, object]) -> None:
    ref.client.log_batch(ref.run_id, tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])


# what this process logged with a step, per run: {run_id: {key: {step: value}}}, for the per-layer summaries
_CURVES: dict[str, dict[str, dict[int, float]]] = {}
_NOTES: dict[str, list[str]] = {}  # markdown tables logged per run, for the run's description


def _log(ref: RunRef, points: list[tuple[str, float, int | None]]) -> None:
    """The one way metrics reach MLflow: dashboard names (metric_names), finite values, batches of _BATCH."""
    now = int(time.time() * 1000)
    kept = [(metric_key(k), float(v), s) for k, v, s in points if v is not None and np.isfinite(v)]
    curves = _CURVES.setdefault(ref.run_id, {})
    for key, value, step in kept:
        if step is not None:
            curves.setdefault(key, {})[step] = value
    batch = [Metric(key, value, now, step or 0) for key, value, step in kept]
    for i in range(0, len(batch), _BATCH):
        ref.client.log_batch(ref.run_id, metrics=batch[i : i + _BATCH])


def log_metrics(ref: RunRef, metrics: Mapping[str, float], step: int | None = None) -> None:
    _log(ref, [(k, v, step) for k, v in metrics.items()])


def log_series(ref: RunRef, name: str, values: list[float] | Mapping[int, float]) -> None:
    """A curve in one call: step = list index or dict key (layer, training step)."""
    items = values.items() if isinstance(values, Mapping) else enumerate(values)
    _log(ref, [(name, v, int(s)) for s, v in items])


def layer_summaries(curves: Mapping[str, Mapping[int, float]]) -> list[dict]:
    """Best value, best layer and mean of every curve (step = layer) with more than one layer, one row each, headline
    sections first: a table (the run's `summary.json` and its description), not one-point charts."""
    rows = []
    for key, curve in curves.items():
        sec, name = key.split("/", 1)
        if len(curve) < 2 or sec in ("run", "sweep"):  # bookkeeping (per-layer seconds) needs no ranking
            continue
        pick = min if lower_is_better(name) else max
        best = pick(curve, key=curve.get)
        rows.append({"key": key, "section": sec, "metric": name, "best": float(curve[best]), "best_layer": int(best),
                     "mean": float(np.mean(list(curve.values()))), "layers": len(curve),
                     "better": "lower" if pick is min else "higher"})
    return sorted(rows, key=lambda r: (not is_headline(f"{r['section']}/"), r["section"], r["metric"]))


def summary_markdown(rows: list[dict], limit: int | None = None) -> str:
    lines = ["| metric | best | at layer | mean | better |", "|---|---|---|---|---|"]
    lines += [f"| `{r['metric']}` | {r['best']:.4g} | {r['best_layer']} | {r['mean']:.4g} | {r['better']} |"
              for r in rows[:limit]]
    return "\n".join(lines)


def _summarize(ref: RunRef, flow: str, model: str) -> list[str]:
    """At a flow run's successful end: the per-layer summary table (MLflow table artifact `summary.json`) and the run's
    description (MLflow's note: the headline curves' summary and the run's tables). Returns the run's headline
    sections."""
    rows = layer_summaries(_CURVES.pop(ref.run_id, {}))
    if rows:
        ref.client.log_table(ref.run_id, data={k: [r[k] for r in rows] for k in rows[0]}, artifact_file="summary.json")
    headline = [r for r in rows if is_headline(f"{r['section']}/")]
    tables = "\n\n".join(_NOTES.pop(ref.run_id, []))
    note = (f"**lensflow {flow}** on `{model}`, commit `{_git_commit()[:10]}`. The first chart section holds the "
            f"headline per-layer curves (step = layer); details, training and bookkeeping follow (schema {SCHEMA}). "
            f"Every curve's best value, best layer and mean: artifact `summary.json`."
            + (f"\n\n{summary_markdown(headline, 12)}" if headline else "") + f"\n\n{tables}")
    set_tags(ref, {"mlflow.note.content": note[:7000]})
    return sorted({r["section"] for r in headline})


VIEW = "mlflow.sharedViewState."  # + view id: MLflow 3.17 keeps the runs page's saved views as experiment tags


def view_id(flow: str) -> str:
    return f"lensflow-{flow}"


def view_address(experiment: str, flow: str) -> str:
    """The runs page (chart view, Model training) with a flow's saved view applied: only its runs, only its headline
    charts."""
    return (f"#/experiments/{experiment}/runs?{WORKFLOW}&compareRunsMode=CHART&viewStateShareKey={view_id(flow)}")


def save_view(uri: str, experiment: str, flow: str, sections: list[str]) -> None:
    """A saved view of the experiment's runs page (its "Views" menu) per flow: the flow's runs, newest first, charts
    filtered to its headline section. MLflow 3.17 stores a view as the experiment tag `mlflow.sharedViewState.<id>`:
    {"name", "createdAt", "updatedAt", "state"}, state being the JSON of the page's search facets and UI state (the
    UI's SavedViewsUtils / useSharedExperimentViewState); rewritten by each run of the flow."""
    now = int(time.time() * 1000)
    state = {"searchFilter": f"tags.flow = '{flow}'", "orderByKey": "attributes.start_time", "orderByAsc": False,
             "startTime": "ALL", "lifecycleFilter": "Active", "modelVersionFilter": "All Runs", "datasetsFilter": [],
             "chartsSearchFilter": f"{sections[0]}/", "hideEmptyCharts": True, "runsHiddenMode": "FIRST_10_RUNS"}
    envelope = {"name": f"{flow}: headline curves", "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
    _Client(uri).set_experiment_tag(experiment, VIEW + view_id(flow), json.dumps(envelope))


def describe_experiment(uri: str, experiment: str) -> str:
    """The experiment's description (MLflow's note on the experiment page), a team's landing page: the address of
    the Model training view, what each flow measures, the latest finished run of each flow with its headline
    figure. Rewritten at the end of every flow run; returns the markdown."""
    client = _Client(uri)
    runs = client.search_runs([experiment], "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
                              max_results=500)
    views = {k for k in client.get_experiment(experiment).tags if k.startswith(VIEW)}
    latest: dict[str, object] = {}
    for r in runs:
        flow = r.data.tags.get("flow")
        if flow and flow != "sweep" and flow not in latest:
            latest[flow] = r
    lines = ["# lensflow results", "",
             (f"Open the runs in MLflow's **Model training** view: [runs](#/experiments/{experiment}/runs?{WORKFLOW}) "
              "(MLflow 3.17 picks GenAI or Model training per browser: the `workflowType` in the address, else the "
              "sidebar's toggle; click **Model training** once). Each run's page opens on its headline per-layer "
              "curves; `summary.json` holds every curve's best value, best layer and mean."), "",
             "| flow | what it measures | latest finished run | model | saved view |", "|---|---|---|---|---|"]
    figures = []
    for flow, r in sorted(latest.items()):
        tags, rid = r.data.tags, r.info.run_id
        link = f"[{r.info.run_name}](#/experiments/{experiment}/runs/{rid}?{WORKFLOW})"
        view = f"[headline charts]({view_address(experiment, flow)})" if VIEW + view_id(flow) in views else ""
        lines.append(f"| `{flow}` | {tags.get(MEASURES, '')} | {link} | `{tags.get('model.name', '')}` | {view} |")
        plots = sorted(f.path for f in client.list_artifacts(rid, "plots") if f.path.endswith(".png"))
        if plots:
            figures.append(f"**{flow}** (`{plots[0]}`)\n\n![{flow}](get-artifact?path={plots[0]}&run_uuid={rid})")
    text = "\n".join(lines) + ("\n\n## Figures of the latest runs\n\n" + "\n\n".join(figures) if figures else "")
    client.set_experiment_tag(experiment, "mlflow.note.content", text[:7000])
    return text


def measures(ref: RunRef, text: str) -> None:
    """What the run's experiment measures, one line (the experiment's note lists it per flow)."""
    set_tags(ref, {MEASURES: " ".join(text.split())})


@dataclass
class LayerTraining:
    """One layer's training in the flow's own run: its settings (and stage), its curves by name (one value per
    training step)."""

    layer: int
    params: dict[str, object]
    curves: dict[str, list[float]]


def log_layer_training(ref: RunRef, name: str, metric_prefix: str, layers: list[LayerTraining]) -> None:
    """Per-layer training logged into the flow's run, never as runs of their own: `<metric_prefix>.<curve>.final`
    with step = layer, a table (`training/<name>.json`: one row per layer, its settings and final values), every
    curve (`training/<name>_curves.json`: layer -> curve -> values) and one figure of them
    (`plots/<name>_training.png`)."""
    if not layers:
        return
    layers = sorted(layers, key=lambda t: t.layer)
    names = sorted({c for t in layers for c in t.curves})
    for curve in names:
        log_series(ref, f"{metric_prefix}.{curve}.final",
                   {t.layer: t.curves[curve][-1] for t in layers if t.curves.get(curve)})
    columns = sorted({k for t in layers for k in t.params} - {"layer"})
    table = {"layer": [t.layer for t in layers]}
    table |= {k: [str(t.params.get(k, "")) for t in layers] for k in columns}
    table |= {f"{n}.final": [t.curves[n][-1] if t.curves.get(n) else None for t in layers] for n in names}
    table |= {f"{n}.steps": [len(t.curves.get(n, [])) for t in layers] for n in names}
    ref.client.log_table(ref.run_id, data=table, artifact_file=f"training/{name}.json")
    ref.client.log_text(ref.run_id, json.dumps({str(t.layer): {n: [float(v) for v in c] for n, c in t.curves.items()}
                                                for t in layers}), f"training/{name}_curves.json")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(4.8 * len(names), 3.6), squeeze=False)
    for ax, curve in zip(axes[0], names):
        colours = plt.cm.viridis(np.linspace(0, 1, len(layers)))
        for t, colour in zip(layers, colours):
            if t.curves.get(curve):
                ax.plot(t.curves[curve], color=colour, linewidth=1, label=f"layer {t.layer}")
        ax.set(title=curve, xlabel="training step")
        ax.grid(alpha=0.3)
    if len(layers) <= 12:
        axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{name}: training, one curve per layer (dark: first layer)")
    fig.tight_layout()
    ref.client.log_figure(ref.run_id, fig, f"plots/{name}_training.png")
    plt.close(fig)


def log_figure(ref: RunRef, fig, artifact_file: str) -> None:
    """A PNG artifact, and the same picture as an image chart (key = the file's name) on the run's dashboard."""
    import matplotlib.pyplot as plt

    ref.client.log_figure(ref.run_id, fig, artifact_file)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    ref.client.log_image(ref.run_id, image, key=Path(artifact_file).stem, step=0)
    plt.close(fig)


def log_text(ref: RunRef, text: str, artifact_file: str) -> None:
    ref.client.log_text(ref.run_id, text, artifact_file)
    if artifact_file.endswith(".md"):
        _NOTES.setdefault(ref.run_id, []).append(text)


def _log_file(ref: RunRef, write, artifact_file: str) -> None:
    folder, name = os.path.split(artifact_file)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        write(path)
        ref.client.log_artifact(ref.run_id, str(path), artifact_path=folder or None)


def log_file(ref: RunRef, path: str | Path, artifact_dir: str | None = None) -> None:
    ref.client.log_artifact(ref.run_id, str(path), artifact_path=artifact_dir)


def log_array(ref: RunRef, array: np.ndarray, artifact_file: str) -> None:
    _log_file(ref, lambda p: np.save(p, array), artifact_file)


def log_tensors(ref: RunRef, tensors: Mapping[str, object], artifact_file: str) -> None:
    from safetensors.torch import save_file

    _log_file(ref, lambda p: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, p), artifact_file)


def load_tensors(tracking_uri: str, run_id: str, artifact_file: str) -> dict:
    """A probe, lens or vector saved by an earlier run, for evaluation without retraining."""
    from safetensors.torch import load_file

    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_file,
                                               tracking_uri=local_uri(tracking_uri))
    return load_file(path)


def load_json(tracking_uri: str, run_id: str, artifact_file: str):
    """A JSON artifact of a run (a table logged with log_table is {"columns": [...], "data": [[...], ...]})."""
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_file,
                                               tracking_uri=local_uri(tracking_uri))
    return json.loads(Path(path).read_text())


def table_rows(tracking_uri: str, run_id: str, artifact_file: str) -> list[dict]:
    """The rows of a table artifact (log_table), as dicts."""
    table = load_json(tracking_uri, run_id, artifact_file)
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def artifact_files(tracking_uri: str, run_id: str, folder: str) -> list[str]:
    """Paths of the artifacts an earlier run logged under `folder`."""
    return [f.path for f in _Client(local_uri(tracking_uri)).list_artifacts(run_id, folder)]


def finished_runs(tracking_uri: str, experiment_id: str, tags: Mapping[str, str], max_results: int = 1000) -> list:
    """Finished runs carrying these tags, newest first: how trained artifacts are found again (resume, reuse)."""
    where = " and ".join([*(f"tags.`{k}` = '{v}'" for k, v in tags.items()), "attributes.status = 'FINISHED'"])
    return MlflowClient(local_uri(tracking_uri)).search_runs([experiment_id], filter_string=where,
                                                            order_by=["attributes.start_time DESC"], max_results=max_results)


def latest_run(tracking_uri: str, experiment: str, flow: str, model_name: str | None = None) -> str | None:
    """The newest finished run of a flow (of this model, when given): the default source of trained artifacts for
    `lensflow lens`."""
    exp = MlflowClient(local_uri(tracking_uri)).get_experiment_by_name(experiment)
    tags = {"flow": flow, **({"model.name": model_name} if model_name else {})}
    runs = finished_runs(tracking_uri, exp.experiment_id, tags, max_results=1) if exp else []
    return runs[0].info.run_id if runs else None


def check_reusable(tracking_uri: str, run_id: str, model_name: str, weights_hash: str | None = None,
                   settings: Mapping[str, object] | None = None) -> None:
    """Reuse (`--run-id`, artifacts of an earlier run) accepts only a FINISHED run of this model, with these
    weights and settings (MLflow params, compared as logged) when given: a killed run's artifacts may be partial,
    and another model's soft prompts or translators decode nonsense. Raises ConfigError saying why."""
    try:
        run = _Client(local_uri(tracking_uri)).get_run(run_id)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise ConfigError(f"MLflow run {run_id}: not found at tracking.uri {redact(tracking_uri)}") from None
    status, tags, params = run.info.status, run.data.tags, run.data.params
    if status != "FINISHED":
        raise ConfigError(f"MLflow run {run_id} is {status}, not FINISHED: what it logged may be partial")
    if tags.get("model.name") != model_name:
        raise ConfigError(f"MLflow run {run_id} is of model {tags.get('model.name')!r}, not model.name {model_name!r}")
    if weights_hash is not None and tags.get("model.weights_hash") != weights_hash:
        raise ConfigError(f"MLflow run {run_id} is of other weights of {model_name} (model.weights_hash "
                          f"{tags.get('model.weights_hash')}, this model's is {weights_hash})")
    for key, value in (settings or {}).items():
        if params.get(key) != str(value):
            raise ConfigError(f"MLflow run {run_id} has {key}={params.get(key)}, not {value}")


@contextmanager
def child_run(parent: RunRef, name: str, params: Mapping[str, object] | None = None) -> Iterator[RunRef]:
    """A nested run, safe to open inside a Ray worker. Per-layer training does not use it (log_layer_training logs
    into the flow's run): dozens of layer runs crowd the runs list."""
    client = parent.client
    run = client.create_run(parent.experiment_id, run_name=name, tags={PARENT: parent.run_id})
    ref = RunRef(parent.tracking_uri, parent.experiment_id, run.info.run_id)
    if params:
        client.log_batch(ref.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    try:
        with _terminated(ref):
            yield ref
    finally:
        _CURVES.pop(ref.run_id, None)
