"""Joining Ray: a private local Ray on loopback, or a cluster by address. Kept apart from the actors (and torch), so the
`lensflow` command starts Ray while the rest of what a flow needs imports."""

from __future__ import annotations

import os
import signal
import socket
import threading

import ray

from lensflow.tasks.core import credentials
from lensflow.tasks.core.config import ConfigError, RayConf

METRICS_SWITCH = "RAY_enable_metrics_collection"  # Ray's setting, read from the environment by each of its processes


def connect(conf: RayConf) -> None:
    """Start a private local Ray on loopback (address "") or join a cluster; idempotent within a process.
    address="local" never joins a cluster that `ray start` left on the machine (plain ray.init() would, and
    hangs when that cluster is gone)."""
    if ray.is_initialized():
        return
    on_sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    with credentials.redacted_entrypoint():
        if conf.address:
            # an explicit list, secrets left out: the runtime_env is shown by the dashboard and the Jobs API;
            # credentials travel in the object store instead (credentials.py, `shipped_credentials`)
            plain, _ = credentials.split_env_vars(conf.env_vars)
            env = {k: os.environ[k] for k in plain if k in os.environ}
            check_answers(conf)  # ray.init retries a silent address for minutes
            ray.init(address=conf.address, runtime_env={"env_vars": env}, log_to_driver=True)
        else:
            # no runtime_env: the local workers are this process's descendants and have its environment already,
            # and a worker without one starts straight away (one with it starts through Ray's setup_worker first)
            loopback_only()
            no_metrics_export()
            ray.init(address="local", include_dashboard=False, log_to_driver=True)
    if on_sigterm is not None:
        signal.signal(signal.SIGTERM, on_sigterm)  # ray.init sets its own (sys.exit): the caller's choice stands


def check_answers(conf: RayConf) -> None:
    """HOST:PORT and ray://HOST:PORT must accept a connection within ray.connect_timeout_s ("auto" is resolved by
    Ray from RAY_ADDRESS or the cluster `ray start` left on this machine)."""
    if conf.address == "auto":
        return
    host, _, port = conf.address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=conf.connect_timeout_s).close()
    except OSError as exc:
        raise ConfigError(f"ray.address={conf.address}: nothing answers there within ray.connect_timeout_s="
                          f"{conf.connect_timeout_s:g} ({exc.strerror or type(exc).__name__})") from None


def loopback_only() -> None:
    """A private local Ray listens on 127.0.0.1 alone (by default GCS, raylet and workers listen on every
    interface). Ray does this for single-machine clusters on macOS and Windows; the same switch (read by the
    processes Ray starts, and by this one) turns it on here. Measured: every socket on 127.0.0.1."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def no_metrics_export() -> None:
    """A private local Ray exports no Prometheus metrics (METRICS_SWITCH=1 in the environment keeps them): with no
    dashboard nothing reads them, and the export cost a fifth of an idle local Ray's CPU (2.2-2.4 s in every 20 s
    against 1.55-1.9 s without, 2-core VM), for as long as a flow runs. A cluster keeps its own setting."""
    os.environ.setdefault(METRICS_SWITCH, "0")
