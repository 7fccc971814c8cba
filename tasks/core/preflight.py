"""What a run needs that can be checked before any model loads or any output exists: the store root, the tracking
server (with this process's credentials), every layer key against the model's depth (read from its config), and the flow's input files. A run that
would fail on these fails in seconds, in one line naming the key or file, having written nothing."""

from __future__ import annotations

import base64
import json
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from lensflow.tasks.core.actors import placed_actors
from lensflow.tasks.core.config import Config, ConfigError, RayConf
from lensflow.tasks.core.models import check_mappable
from lensflow.tasks.core.redact import redact
from lensflow.tasks.core.stages import is_remote

TRACKING_TIMEOUT_S = 5.0


def _writable_ancestor(path: Path, key: str) -> None:
    """The folder need not exist yet (nothing is created here), but the nearest existing ancestor must be writable."""
    p = path.resolve()
    while not p.exists():
        p = p.parent
    try:
        with tempfile.TemporaryFile(dir=p):  # os.access says yes to root even on a read-only file system
            pass
    except OSError as exc:
        raise ConfigError(f"{key} {path}: {p} is not a writable folder ({exc.strerror})") from None


def check_store_root(root: str) -> None:
    if not is_remote(root):
        _writable_ancestor(Path(root.removeprefix("file://")), "store.root")
        return
    import fsspec

    try:
        # a probe of its own: fsspec caches file systems by their options, and one made without credentials would
        # be handed to every later call in this process (a driver that gets its credentials afterwards)
        fs, path = fsspec.core.url_to_fs(root, skip_instance_cache=True)
        fs.exists(path)  # a missing bucket, bad credentials or an unreachable endpoint fail here
    except ImportError as exc:
        raise ConfigError(f"store.root {redact(root)}: {exc} (pip install 'lensflow[s3]' for s3://)") from None
    except Exception as exc:  # botocore, gcsfs, ... each raise their own types
        raise ConfigError(f"store.root {redact(root)}: not reachable ({type(exc).__name__}: "
                          f"{redact(str(exc).splitlines()[0] if str(exc) else '')})") from None


def _auth_header(parts: urllib.parse.SplitResult) -> dict[str, str]:
    """What MLflow's client sends: user:password@ in the URI, else MLFLOW_TRACKING_TOKEN, else
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."""
    user, password = parts.username, parts.password
    if user is None and os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    if user is None and os.environ.get("MLFLOW_TRACKING_USERNAME"):
        user, password = os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    if user is None:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password or ''}".encode()).decode()}


def _call(base: str, path: str, headers: dict[str, str], body: dict | None = None) -> tuple[int, dict]:
    """One REST call, bounded by TRACKING_TIMEOUT_S (MLflow's own client retries for minutes): (status, JSON)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, headers={**headers, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TRACKING_TIMEOUT_S) as r:
            return r.status, _json(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, _json(exc.read())


def _json(body: bytes) -> dict:
    try:
        reply = json.loads(body or b"{}")
    except ValueError:  # /health answers "OK"; a proxy's error page is HTML
        return {}
    return reply if isinstance(reply, dict) else {}


def check_tracking(uri: str, experiment: str = "lensflow") -> None:
    """A server must answer, and accept this process's credentials for the experiment (got, or created): /health
    alone needs no login, so a refused password would otherwise show after the extraction has run."""
    if uri.startswith("sqlite:///"):
        _writable_ancestor(Path(uri.removeprefix("sqlite:///")).parent, "tracking.uri")
        return
    if not uri.startswith(("http://", "https://")):
        return
    parts = urllib.parse.urlsplit(uri)
    base = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl().rstrip("/")  # urllib takes no user@
    headers = _auth_header(parts)
    try:
        status, _ = _call(base, "/health", headers)
        if status != 200:
            raise ConfigError(f"tracking.uri {redact(uri)}: /health answered HTTP {status}, not an MLflow server")
        query = urllib.parse.urlencode({"experiment_name": experiment})
        status, reply = _call(base, f"/api/2.0/mlflow/experiments/get-by-name?{query}", headers)
        if status == 404:
            status, reply = _call(base, "/api/2.0/mlflow/experiments/create", headers, {"name": experiment})
            if reply.get("error_code") == "RESOURCE_ALREADY_EXISTS":  # another driver created it meanwhile
                status = 200
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(f"tracking.uri {redact(uri)}: no MLflow server answers ({reason})") from None
    if status in (401, 403):
        given = "credentials refused" if headers else "the server needs a login"
        raise ConfigError(f"tracking.uri {redact(uri)}: HTTP {status}, {given} (set MLFLOW_TRACKING_USERNAME and "
                          f"MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN, in the driver's environment)")
    if status != 200:
        raise ConfigError(f"tracking.uri {redact(uri)}: getting or creating tracking.experiment={experiment} "
                          f"answered HTTP {status} ({redact(str(reply.get('message', '')))[:200]})")


def check_layers(conf: Config, n_layers: int) -> None:
    """Every config key that names residual layers (`*.layers`, `*.layer`) is within 0..n_layers."""
    for key, value in conf.flat().items():
        if not key.endswith((".layers", ".layer", "_layers")) or value is None or isinstance(value, str):
            continue
        bad = [l for l in (value if isinstance(value, list) else [value]) if isinstance(l, int) and not 0 <= l <= n_layers]
        if bad:
            raise ConfigError(f"config key '{key}': {bad} out of range 0..{n_layers} for {conf.model.name}")


def check_local_placement(rc: RayConf) -> None:
    """A private local Ray has this machine's CPUs and GPUs: an actor request it cannot hold fails now, not after
    Ray started (a cluster is checked against its live nodes when the pool starts: actors.check_placement)."""
    if rc.address:
        return
    import torch

    node = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
    gpus = (1.0 if node["GPU"] >= 1 else 0.0) if rc.gpus_per_actor == "auto" else float(rc.gpus_per_actor)
    if gpus > node["GPU"]:
        raise ConfigError(f"ray.gpus_per_actor={gpus:g}: this machine has {node['GPU']:g} GPUs")
    placeable = placed_actors(rc, gpus, [node])
    wanted, key = (rc.min_actors, "ray.min_actors") if rc.actors == "auto" else (rc.actors, "ray.actors")
    if placeable < wanted:
        raise ConfigError(f"{key}={wanted} with ray.cpus_per_actor={rc.cpus_per_actor:g} each: this machine "
                          f"holds {placeable} ({node['CPU']:g} CPUs)")


def preflight(conf: Config, inputs: Callable[[Config], object] | None = None) -> None:
    """All checks, cheapest first; `inputs` reads and validates the flow's own input files."""
    check_local_placement(conf.ray)
    check_layers(conf, check_mappable(conf.model))
    if inputs is not None:
        inputs(conf)
    check_store_root(conf.store.root)
    check_tracking(conf.tracking.uri, conf.tracking.experiment)
