"""What a run needs that can be checked before any model loads or any output exists: the store root, the tracking
server, every layer key against the model's depth (read from its config), and the flow's input files. A run that
would fail on these fails in seconds, in one line naming the key or file, having written nothing."""

from __future__ import annotations

import base64
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
        fs, path = fsspec.core.url_to_fs(root)
        fs.exists(path)  # a missing bucket, bad credentials or an unreachable endpoint fail here
    except ImportError as exc:
        raise ConfigError(f"store.root {redact(root)}: {exc} (pip install 'lensflow[s3]' for s3://)") from None
    except Exception as exc:  # botocore, gcsfs, ... each raise their own types
        raise ConfigError(f"store.root {redact(root)}: not reachable ({type(exc).__name__}: "
                          f"{redact(str(exc).splitlines()[0] if str(exc) else '')})") from None


def check_tracking(uri: str) -> None:
    if uri.startswith("sqlite:///"):
        _writable_ancestor(Path(uri.removeprefix("sqlite:///")).parent, "tracking.uri")
    elif uri.startswith(("http://", "https://")):
        parts = urllib.parse.urlsplit(uri)
        request = urllib.request.Request(parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl().rstrip("/")
                                         + "/health")  # urllib takes no user:password@ in a URL; MLflow sends it
        if parts.username is not None:
            token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=TRACKING_TIMEOUT_S) as r:
                r.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConfigError(f"tracking.uri {redact(uri)}: no MLflow server answers ({reason})") from None


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
    if placeable < rc.actors:
        raise ConfigError(f"ray.actors={rc.actors} with ray.cpus_per_actor={rc.cpus_per_actor:g} each: this machine "
                          f"holds {placeable} ({node['CPU']:g} CPUs)")


def preflight(conf: Config, inputs: Callable[[Config], object] | None = None) -> None:
    """All checks, cheapest first; `inputs` reads and validates the flow's own input files."""
    check_local_placement(conf.ray)
    check_layers(conf, check_mappable(conf.model))
    if inputs is not None:
        inputs(conf)
    check_store_root(conf.store.root)
    check_tracking(conf.tracking.uri)
