"""Ray model actors (`ModelPool.map`) and model-free Ray remote functions (`map_remote`).

Model work goes to long-lived actors (loading a model per task would dominate); Ray's own fault tolerance
(max_restarts / max_task_retries) replaces a killed actor and re-runs the item it held, so callers see
every item exactly once. Work without a model (per-layer probe, lens and SAE training) is plain Ray tasks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import ray
import torch

from lensflow.tasks.config import Config, ConfigError, ModelConf, RayConf
from lensflow.tasks.models import ModelInfo, describe
from lensflow.tasks.progress import progress

T = TypeVar("T")


def connect(conf: RayConf) -> None:
    """Start a private local Ray on loopback (address "") or join a cluster; idempotent within a process.
    address="local" never joins a cluster that `ray start` left on the machine (plain ray.init() would, and
    hangs when that cluster is gone)."""
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in conf.env_vars if k in os.environ}  # an explicit list: no token by accident
    if conf.address:
        ray.init(address=conf.address, runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        loopback_only()
        ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=True)


def loopback_only() -> None:
    """A private local Ray listens on 127.0.0.1 alone (by default GCS, raylet and workers listen on every
    interface). Ray does this for single-machine clusters on macOS and Windows; the same switch (read by the
    processes Ray starts, and by this one) turns it on here. Measured: every socket on 127.0.0.1."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def _gpus(conf: RayConf) -> float:
    available = ray.cluster_resources().get("GPU", 0)
    if conf.gpus_per_actor == "auto":
        return 1.0 if available >= 1 else 0.0
    if conf.gpus_per_actor > available:  # Ray would wait forever for GPUs that do not exist
        raise ConfigError(f"ray.gpus_per_actor={conf.gpus_per_actor}: the cluster has {available} GPUs")
    return float(conf.gpus_per_actor)


def placed_actors(conf: RayConf, gpus: float, nodes: list[dict]) -> int:
    """How many actors of conf's size the nodes (Ray resource dicts) can hold at once."""

    def fits(res: dict) -> int:
        by_cpu = int(res.get("CPU", 0) // conf.cpus_per_actor)
        return min(by_cpu, int(res.get("GPU", 0) // gpus)) if gpus else by_cpu

    return sum(fits(r) for r in nodes)


def check_placement(conf: RayConf, gpus: float) -> None:
    """Ray waits forever, silently, for an actor no node can hold: refuse in one line before any model loads."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    placed = placed_actors(conf, gpus, nodes)
    if placed < conf.actors:
        have = ", ".join(f"{r.get('CPU', 0):g} CPU/{r.get('GPU', 0):g} GPU" for r in nodes) or "no live nodes"
        raise ConfigError(f"ray.actors={conf.actors} with ray.cpus_per_actor={conf.cpus_per_actor:g} and {gpus:g} GPU "
                          f"each: the cluster can place {placed} ({len(nodes)} node(s): {have})")


def _to_cpu(x: Any) -> Any:
    if torch.is_tensor(x):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x


@ray.remote
class ModelActor:
    """Holds one model; `call` runs a module-level function fn(lm, item) next to it."""

    def __init__(self, model: dict, torch_threads: int | None):
        from lensflow.tasks.models import load_model

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.lm = load_model(ModelConf(**model))

    def call(self, fn: Callable[..., T], item: Any) -> T:
        return _to_cpu(fn(self.lm, item))

    def pid(self) -> int:
        return os.getpid()


class ModelPool:
    """ray.actors model actors, GPU each when the cluster has GPUs; use as a context manager."""

    def __init__(self, conf: Config, size: int | None = None):
        connect(conf.ray)
        rc = conf.ray
        gpus = _gpus(rc)
        check_placement(rc, gpus)
        threads = rc.torch_threads or max(1, int(rc.cpus_per_actor))
        opts = dict(num_cpus=rc.cpus_per_actor, num_gpus=gpus, max_restarts=rc.max_restarts, max_task_retries=rc.max_restarts)
        model = conf.model.model_dump()
        self.actors = [ModelActor.options(**opts).remote(model, threads) for _ in range(size or rc.actors)]
        self._info: ModelInfo | None = None

    @property
    def size(self) -> int:
        return len(self.actors)

    def describe(self) -> ModelInfo:
        """The model's identity and shape, asked of one actor once per pool."""
        if self._info is None:
            self._info = self.map(describe, [None], desc="describe model")[0]
        return self._info

    def map(self, fn: Callable[..., T], items: Sequence[Any], desc: str = "", in_flight: int = 2) -> list[T]:
        """fn(lm, item) for every item, order preserved; at most `in_flight` queued per actor."""
        results: list[Any] = [None] * len(items)
        pending: dict[ray.ObjectRef, int] = {}
        todo = list(enumerate(items))[::-1]
        load = {i: 0 for i in range(self.size)}
        owner: dict[ray.ObjectRef, int] = {}
        with progress(len(items), desc or getattr(fn, "__name__", "work")) as bar:
            while todo or pending:
                for a in range(self.size):
                    while todo and load[a] < in_flight:
                        i, item = todo.pop()
                        ref = self.actors[a].call.remote(fn, item)
                        pending[ref], owner[ref] = i, a
                        load[a] += 1
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    results[pending.pop(ref)] = ray.get(ref)
                    load[owner.pop(ref)] -= 1
                    bar.update(1)
        return results

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def __enter__(self) -> ModelPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def map_remote(fn: Callable[..., T], items: Sequence[Any], desc: str, conf: RayConf, num_cpus: float = 1,
              num_gpus: float = 0) -> list[T]:
    """fn(item) as independent Ray tasks (retried if their worker dies), order preserved, with a progress bar."""
    connect(conf)
    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=conf.max_restarts)(fn)
    refs = [remote.remote(item) for item in items]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    waiting = list(refs)
    with progress(len(refs), desc, unit="task") as bar:
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            results[index[done[0]]] = ray.get(done[0])
            bar.update(1)
    return results
