"""MLflow, in one place: every flow logs its run the same way.

The driver creates the database, the experiment and the run; workers receive a picklable RunRef and log
through MlflowClient (no fluent global state), because concurrent `set_experiment` calls and concurrent
sqlite schema creation are measured to misfile or fail. Metrics go in batches (log_batch is ~50x faster
than one call per metric); per-layer metrics use step = layer so MLflow draws the curve itself.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from lensflow.tasks.config import Config
from lensflow.tasks.redact import redact

_BATCH = 900  # log_batch accepts up to 1000 metrics per call


@dataclass(frozen=True)
class RunRef:
    tracking_uri: str
    experiment_id: str
    run_id: str

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)


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


def experiment_id(uri: str, name: str) -> str:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside the database rather than in ./mlruns of whatever cwd
        artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifacts)
    except mlflow.exceptions.MlflowException:  # a concurrent run created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@contextmanager
def flow_run(conf: Config, flow: str) -> Iterator[RunRef]:
    """One MLflow run per flow run: resolved config as params, git commit and flow as tags."""
    uri = local_uri(conf.tracking.uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = experiment_id(uri, conf.tracking.experiment)
    tags = {"flow": flow, "mlflow.source.git.commit": _git_commit(), "model.name": conf.model.name}
    try:
        from prefect.runtime import flow_run as prefect_run

        if prefect_run.id:
            tags["prefect.flow_run_id"] = str(prefect_run.id)
    except ImportError:
        pass
    run = client.create_run(exp, run_name=f"{flow}-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
    ref = RunRef(uri, exp, run.info.run_id)
    params = [Param(k, redact(str(v))[:6000]) for k, v in conf.flat().items()]
    for i in range(0, len(params), 100):
        client.log_batch(ref.run_id, params=params[i : i + 100])
    print(f"MLflow run {ref.run_id} (experiment '{conf.tracking.experiment}') at {redact(uri)}")
    with _terminated(ref):
        yield ref


@contextmanager
def _terminated(ref: RunRef) -> Iterator[None]:
    """FINISHED when the block completes, FAILED (and re-raised) when it does not."""
    try:
        yield
    except BaseException:
        ref.client.set_terminated(ref.run_id, "FAILED")
        raise
    ref.client.set_terminated(ref.run_id, "FINISHED")


def tag_model(ref: RunRef, info) -> None:
    """The model identity every stage key includes (info: models.ModelInfo), so runs can be matched to stages."""
    set_tags(ref, {f"model.{k}": v for k, v in asdict(info.id).items() if v is not None})


def log_extraction(ref: RunRef, ex, label: str) -> None:
    """An activation store's URI and this run's extraction counters, the same way for every flow that extracts."""
    set_tags(ref, {f"store.{label}": ex.url})
    log_metrics(ref, {f"extract.{label}.{k}": v for k, v in ex.metrics().items()})


def set_tags(ref: RunRef, tags: Mapping[str, object]) -> None:
    ref.client.log_batch(ref.run_id, tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])


def log_metrics(ref: RunRef, metrics: Mapping[str, float], step: int | None = None) -> None:
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None and np.isfinite(v)]
    for i in range(0, len(batch), _BATCH):
        ref.client.log_batch(ref.run_id, metrics=batch[i : i + _BATCH])


def log_series(ref: RunRef, name: str, values: list[float] | Mapping[int, float]) -> None:
    """A curve in one call: step = list index or dict key (layer, training step)."""
    items = values.items() if isinstance(values, Mapping) else enumerate(values)
    now = int(time.time() * 1000)
    batch = [Metric(name, float(v), now, int(s)) for s, v in items if np.isfinite(v)]
    for i in range(0, len(batch), _BATCH):
        ref.client.log_batch(ref.run_id, metrics=batch[i : i + _BATCH])


def log_figure(ref: RunRef, fig, artifact_file: str) -> None:
    import matplotlib.pyplot as plt

    ref.client.log_figure(ref.run_id, fig, artifact_file)
    plt.close(fig)


def log_text(ref: RunRef, text: str, artifact_file: str) -> None:
    ref.client.log_text(ref.run_id, text, artifact_file)


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


def finished_runs(tracking_uri: str, experiment_id: str, tags: Mapping[str, str], max_results: int = 1000) -> list:
    """Finished runs carrying these tags, newest first: how trained artifacts are found again (resume, reuse)."""
    where = " and ".join([*(f"tags.`{k}` = '{v}'" for k, v in tags.items()), "attributes.status = 'FINISHED'"])
    return MlflowClient(local_uri(tracking_uri)).search_runs([experiment_id], filter_string=where,
                                                            order_by=["attributes.start_time DESC"], max_results=max_results)


def latest_run(tracking_uri: str, experiment: str, flow: str) -> str | None:
    """The newest finished run of a flow: the default source of trained artifacts for `lensflow lens`."""
    exp = MlflowClient(local_uri(tracking_uri)).get_experiment_by_name(experiment)
    runs = finished_runs(tracking_uri, exp.experiment_id, {"flow": flow}, max_results=1) if exp else []
    return runs[0].info.run_id if runs else None


@contextmanager
def child_run(parent: RunRef, name: str, params: Mapping[str, object] | None = None) -> Iterator[RunRef]:
    """A nested run (e.g. one layer's training job), safe to open inside a Ray worker."""
    client = parent.client
    run = client.create_run(parent.experiment_id, run_name=name, tags={"mlflow.parentRunId": parent.run_id})
    ref = RunRef(parent.tracking_uri, parent.experiment_id, run.info.run_id)
    if params:
        client.log_batch(ref.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    with _terminated(ref):
        yield ref
