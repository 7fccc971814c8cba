"""Ray model actors (`ModelPool.map`) and model-free Ray remote functions (`map_remote`).

Model work goes to long-lived actors (loading a model per task would dominate). Work goes only to actors that
have started (a request no node can hold is refused before any model loads); an actor lost with its node has its
items resubmitted to the actors that remain, while Ray restarts it wherever it fits, and it gets work again once
it is back (a node that returns is used again). Every wait is bounded by ray.timeout_s and fails naming the stage.
Work without a model (per-layer probe, lens and SAE training) is plain Ray tasks, retried by Ray. Both get the
driver's credentials by value (credentials.py) and actors the cluster's copy of the weights (weights.py).
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import ray
import torch
from ray.exceptions import (
    ActorDiedError,
    GetTimeoutError,
    ObjectLostError,
    RayActorError,
)

from lensflow.tasks.core import credentials, weights
from lensflow.tasks.core.config import Config, ConfigError, ModelConf, RayConf
from lensflow.tasks.core.models import ModelInfo, describe
from lensflow.tasks.core.progress import progress
from lensflow.tasks.core.ray_cluster import connect

T = TypeVar("T")


def shipped_credentials(conf: RayConf) -> ray.ObjectRef:
    """The driver's credentials as one object: passed as a top-level argument, Ray hands each actor or task the
    value (credentials.Bundle), which it applies before any work."""
    return ray.put(credentials.collect(conf.env_vars))


def _gpus(conf: RayConf) -> float:
    available = ray.cluster_resources().get("GPU", 0)
    if conf.gpus_per_actor == "auto":
        return 1.0 if available >= 1 else 0.0
    if conf.gpus_per_actor > available:  # Ray would wait forever for GPUs that do not exist
        raise ConfigError(f"ray.gpus_per_actor={conf.gpus_per_actor:g}: the cluster has {available:g} GPUs")
    return float(conf.gpus_per_actor)


def placed_actors(conf: RayConf, gpus: float, nodes: list[dict]) -> int:
    """How many actors of conf's size the nodes (Ray resource dicts) can hold at once."""

    def fits(res: dict) -> int:
        by_cpu = int(res.get("CPU", 0) // conf.cpus_per_actor)
        return min(by_cpu, int(res.get("GPU", 0) // gpus)) if gpus else by_cpu

    return sum(fits(r) for r in nodes)


def live_nodes() -> list[dict]:
    """Resource dicts of the cluster's live nodes."""
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def describe_nodes(nodes: list[dict]) -> str:
    have = ", ".join(f"{r.get('CPU', 0):g} CPU/{r.get('GPU', 0):g} GPU" for r in nodes)
    return f"{len(nodes)} node(s): {have or 'none live'}"


def free_actors(conf: RayConf, gpus: float) -> int:
    """How many more actors of conf's size fit in what the cluster has free now: per node by its totals, capped by
    the cluster's free CPUs and GPUs (Ray's public API gives free resources for the whole cluster only, so a
    fragmented cluster can be over-counted; an actor that does not fit waits, and the pool never waits for it)."""
    free = ray.available_resources()
    by_free = int(free.get("CPU", 0) // conf.cpus_per_actor)
    if gpus:
        by_free = min(by_free, int(free.get("GPU", 0) // gpus))
    return min(placed_actors(conf, gpus, live_nodes()), by_free)


def auto_size(conf: RayConf, gpus: float) -> int:
    """ray.actors=auto: the free room, within ray.min_actors..ray.max_actors; fewer than the minimum is refused."""
    room = free_actors(conf, gpus)
    if room < conf.min_actors:
        raise ConfigError(f"ray.actors=auto with ray.min_actors={conf.min_actors}: the cluster has room for {room} now "
                          f"(ray.cpus_per_actor={conf.cpus_per_actor:g}, {gpus:g} GPU each; free "
                          f"{ray.available_resources().get('CPU', 0):g} CPU/{ray.available_resources().get('GPU', 0):g} "
                          f"GPU of {describe_nodes(live_nodes())})")
    return min(room, conf.max_actors)


def check_placement(conf: RayConf, gpus: float, actors: int) -> None:
    """Ray waits forever, silently, for an actor no node can hold: refuse in one line before any model loads."""
    nodes = live_nodes()
    placed = placed_actors(conf, gpus, nodes)
    if placed < actors:
        raise ConfigError(f"ray.actors={actors} with ray.cpus_per_actor={conf.cpus_per_actor:g} and {gpus:g} GPU "
                          f"each: the cluster can place {placed} ({describe_nodes(nodes)})")


def check_task_fits(desc: str, num_cpus: float, num_gpus: float) -> None:
    """A Ray task no live node can hold would wait forever: refuse in one line."""
    nodes = live_nodes()
    if not any(r.get("CPU", 0) >= num_cpus and r.get("GPU", 0) >= num_gpus for r in nodes):
        raise ConfigError(f"{desc}: each task asks for {num_cpus:g} CPU and {num_gpus:g} GPU; no node has that "
                          f"({describe_nodes(nodes)})")


def check_store_shared(conf: Config) -> None:
    """Workers write stage outputs under store.root themselves: on a cluster of several nodes a local folder
    would be each node's own disk (work silently scattered). An object store, or a folder declared shared."""
    from lensflow.tasks.core.stages import is_remote

    n = len(live_nodes())
    if n > 1 and not is_remote(conf.store.root) and not conf.store.shared:
        raise ConfigError(f"store.root={conf.store.root}: a local folder, and the Ray cluster has {n} nodes; use an "
                          f"object store (s3://bucket/prefix) or set store.shared=true if every node mounts it there")


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

    def __init__(self, model: dict, torch_threads: int | None, creds: credentials.Bundle | None = None,
                 weights: str | None = None):
        from lensflow.tasks.core.models import load_model

        credentials.apply(creds)  # before the load: a Hub token, the weights cache in the store
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.lm = load_model(ModelConf(**model), weights=weights)

    def call(self, fn: Callable[..., T], item: Any) -> T:
        return _to_cpu(fn(self.lm, item))

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        """The Ray node id: answers once the model is loaded (again, after a restart)."""
        return ray.get_runtime_context().get_node_id()


def _actor_factory(conf: Config, gpus: float) -> Callable[[], ray.actor.ActorHandle]:
    rc = conf.ray
    threads = rc.torch_threads or max(1, int(rc.cpus_per_actor))
    opts = dict(num_cpus=rc.cpus_per_actor, num_gpus=gpus, max_restarts=rc.max_restarts, max_task_retries=0)
    return functools.partial(ModelActor.options(**opts).remote, conf.model.model_dump(), threads,
                             shipped_credentials(rc), weights.publish(conf))


def _early_key(conf: Config, gpus: float) -> str:
    """What the early actor was started with (and in which Ray job): a pool asking for anything else starts its own."""
    return json.dumps([ray.get_runtime_context().get_job_id(), conf.model.model_dump(mode="json"),
                       conf.ray.model_dump(mode="json"), conf.store.root, gpus], sort_keys=True)


_early: dict[str, tuple[Callable[[], ray.actor.ActorHandle], ray.actor.ActorHandle]] = {}  # until a pool takes it


def start_early(conf: Config) -> ray.actor.ActorHandle | None:
    """Start the first model actor of the flow's pool now, while Prefect's server and the flow's modules start:
    its model loads meanwhile (about 5 s of imports and loading on a CPU, which came after the flow's start in a
    2-prompt run). The pool that opens with the same model and actor options takes it; where none does, it is
    stopped with Ray. Not for pools that size themselves (ray.actors=auto) or wait for GPUs first (ray.gpu_limit)."""
    from lensflow.tasks.core.models import prepare

    if conf.ray.actors == "auto" or conf.ray.gpu_limit or _early:
        return None
    connect(conf.ray)
    gpus = _gpus(conf.ray)
    check_placement(conf.ray, gpus, 1)
    prepare(conf.model)  # as the session does first: the embedded GGUF converts once, in this process
    new_actor = _actor_factory(conf, gpus)  # kept with the actor: Ray restarts it from these arguments
    _early[_early_key(conf, gpus)] = (new_actor, actor := new_actor())
    return actor


LOST = (RayActorError, ObjectLostError)  # the actor (or the node holding its result) is gone: the item is redone
RETRY_PROBE_S = 1.0  # how soon an actor that was unavailable is asked again whether it is back
GROW_EVERY_S = 5.0  # how often an elastic pool (ray.actors=auto) looks for free room


class ModelPool:
    """ray.actors model actors, GPU each when the cluster has GPUs; use as a context manager. With ray.actors=auto
    the pool starts with the free room and grows while it works (`_grow`); an actor lost for good just leaves it.

    Each actor is probed (`node`) until it answers: only actors that answered get work, so an actor Ray cannot
    place (or restart) never holds items, and one that comes back after a restart is used again."""

    def __init__(self, conf: Config, size: int | None = None):
        connect(conf.ray)
        rc = self.conf = conf.ray
        self.gpus = _gpus(rc)
        self.elastic = size is None and rc.actors == "auto"
        if self.elastic:
            size = auto_size(rc, self.gpus)
        else:
            size = size or int(rc.actors)
            check_placement(rc, self.gpus, size)
        check_store_shared(conf)
        if self.elastic:
            self._ask_autoscaler(rc.max_actors)
        early = _early.pop(_early_key(conf, self.gpus), None)  # (its factory, the actor)
        self._new_actor = early[0] if early else _actor_factory(conf, self.gpus)  # holds the actors' arguments
        self.timeout_s, self.max_restarts = rc.timeout_s, rc.max_restarts
        self.actors = [early[1]] if early else []
        self.actors += [self._new_actor() for _ in range(size - len(self.actors))]
        self._grown_at = time.monotonic()
        self.nodes: dict[int, str] = {}  # live actor -> its node id
        self._dead: set[int] = set()  # actors gone for good (their slots count no more against ray.max_actors)
        self._probes: dict[ray.ObjectRef, int] = {}
        self._retry_at: dict[int, float] = {}
        self._death: ActorDiedError | None = None
        for a in range(self.size):
            self._probe(a)
        self._info: ModelInfo | None = None

    @property
    def size(self) -> int:
        return len(self.actors)

    def describe(self) -> ModelInfo:
        """The model's identity and shape, asked of one actor once per pool."""
        if self._info is None:
            self._info = self.map(describe, [None], desc="describe model")[0]
        return self._info

    def _ask_autoscaler(self, actors: int) -> None:
        """GPU actors up to ray.max_actors: the cluster's autoscaler (ray up, KubeRay in-tree) adds nodes for them,
        and `_grow` starts actors there. A standing request of this driver's, withdrawn on close."""
        if self.gpus:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[{"CPU": self.conf.cpus_per_actor, "GPU": self.gpus}] * actors)

    def _grow(self) -> None:
        """ray.actors=auto: once every actor is up, new actors for the room that nodes joining (the autoscaler's,
        a replaced spot node) or other runs finishing have freed, up to ray.max_actors."""
        if (not self.elastic or time.monotonic() - self._grown_at < GROW_EVERY_S
                or len(self.nodes) + len(self._dead) < self.size or self.size - len(self._dead) >= self.conf.max_actors):
            return
        self._grown_at = time.monotonic()
        for _ in range(min(free_actors(self.conf, self.gpus), self.conf.max_actors - self.size + len(self._dead))):
            self.actors.append(self._new_actor())
            self._probe(self.size - 1)

    def _probe(self, a: int) -> None:
        self._probes[self.actors[a].node.remote()] = a

    def _lost(self, a: int) -> None:
        """Actor a failed an item: no more work until its probe answers (after Ray restarted it, if it can)."""
        if self.nodes.pop(a, None) is not None and a not in self._probes.values():
            self._probe(a)

    def _answered(self, ref: ray.ObjectRef) -> bool:
        """Whether the probed actor is up (it then gets work)."""
        a = self._probes.pop(ref)
        try:
            node = ray.get(ref, timeout=self.timeout_s)
        except ActorDiedError as exc:  # out of restarts, killed, or its model failed to load: gone for good
            self._death = exc
            self._dead.add(a)
            return False
        except LOST:  # unavailable for now (its node is being declared dead): ask again shortly
            self._retry_at[a] = time.monotonic() + RETRY_PROBE_S
            return False
        self.nodes[a] = node
        print(f"model actor {a + 1}/{self.size} up on node {node[:8]} ({len(set(self.nodes.values()))} node(s) in use)")
        return True

    def map(self, fn: Callable[..., T], items: Sequence[Any], desc: str = "", in_flight: int = 2) -> list[T]:
        """fn(lm, item) for every item, order preserved; at most `in_flight` queued per live actor. Fails naming
        `desc` when nothing finishes for ray.timeout_s or when every actor is gone for good."""
        desc = desc or getattr(fn, "__name__", "work")
        results: list[Any] = [None] * len(items)
        pending: dict[ray.ObjectRef, tuple[int, int]] = {}  # ref -> (item, actor)
        todo = list(range(len(items)))[::-1]
        progressed = time.monotonic()  # an item finished or an actor came up
        with progress(len(items), desc or getattr(fn, "__name__", "work")) as bar:
            while todo or pending:
                self._reprobe()
                self._grow()
                self._submit(fn, items, todo, pending, in_flight)
                if not pending and not self._probes and not self._retry_at:
                    cause = [l for l in str(self._death).splitlines() if l.strip()][-1:] or ["unknown"]
                    raise RuntimeError(f"{desc}: every model actor is gone, {len(todo)} of {len(items)} items not "
                                       f"done (ray.max_restarts={self.max_restarts}); last: {cause[0][:300]}") \
                        from self._death
                left = max(0.0, progressed + self.timeout_s - time.monotonic())
                waiting = [*pending, *self._probes]
                if waiting:
                    wait_s = min(left, RETRY_PROBE_S) if self._retry_at else min(left, GROW_EVERY_S) if \
                        self.elastic else left
                    done, _ = ray.wait(waiting, num_returns=1, timeout=wait_s)
                else:  # every actor is restarting: only re-asking is left
                    done = []
                    time.sleep(min(left, RETRY_PROBE_S))
                if not done and time.monotonic() - progressed >= self.timeout_s:
                    raise TimeoutError(f"{desc}: nothing finished in ray.timeout_s={self.timeout_s:g} s "
                                       f"({len(self.nodes)} of {self.size} model actors up, {len(todo) + len(pending)} "
                                       f"of {len(items)} items left; cluster {describe_nodes(live_nodes())})")
                for ref in done:
                    if ref in self._probes:
                        if self._answered(ref):
                            progressed = time.monotonic()
                        continue
                    i, a = pending.pop(ref)
                    try:
                        results[i] = ray.get(ref, timeout=self.timeout_s)
                    except LOST:
                        todo.append(i)  # redone by an actor that is up
                        self._lost(a)
                        continue
                    except GetTimeoutError:
                        raise TimeoutError(f"{desc}: a finished item's result did not arrive in ray.timeout_s="
                                           f"{self.timeout_s:g} s") from None
                    progressed = time.monotonic()
                    bar.update(1)
        return results

    def _reprobe(self) -> None:
        now = time.monotonic()
        for a, at in list(self._retry_at.items()):
            if at <= now:
                del self._retry_at[a]
                self._probe(a)

    def _submit(self, fn: Callable[..., Any], items: Sequence[Any], todo: list[int],
                pending: dict[ray.ObjectRef, tuple[int, int]], in_flight: int) -> None:
        """Top up every live actor to `in_flight` queued items."""
        load = {a: 0 for a in self.nodes}
        for _, a in pending.values():
            if a in load:
                load[a] += 1
        for a in load:
            while todo and load[a] < in_flight:
                i = todo.pop()
                pending[self.actors[a].call.remote(fn, items[i])] = (i, a)
                load[a] += 1

    def close(self) -> None:
        if self.elastic:
            self._ask_autoscaler(0)
        for a in self.actors:
            ray.kill(a)
        self.actors, self.nodes, self._probes, self._retry_at = [], {}, {}, {}

    def __enter__(self) -> ModelPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _releasing_gpu_memory(fn: Callable[[Any], T], item: Any, creds: credentials.Bundle | None = None) -> T:
    """fn(item) with the driver's credentials in the environment, then the worker's cached GPU blocks back to the
    device: the worker lives on for the next task, and tasks sharing a GPU (fractional num_gpus) must not hold each
    other's memory."""
    credentials.apply(creds)
    try:
        return fn(item)
    finally:
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def map_remote(fn: Callable[..., T], items: Sequence[Any], desc: str, conf: RayConf, num_cpus: float = 1,
               num_gpus: float = 0) -> list[T]:
    """fn(item) as independent Ray tasks (retried if their worker or node dies), order preserved, with a progress
    bar; fails naming `desc` when no task finishes for ray.timeout_s."""
    connect(conf)
    check_task_fits(desc, num_cpus, num_gpus)
    # max_calls=0: Ray's default for a GPU task is a fresh worker per call (max_calls=1), which costs a Python
    # start, the imports and a CUDA context per task: 20 of the 23 s of a SmolLM2 tuned-lens layer on an H100
    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=conf.max_restarts, max_calls=0)(
        _releasing_gpu_memory)
    creds = shipped_credentials(conf)
    refs = [remote.remote(fn, item, creds) for item in items]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    waiting = list(refs)
    with progress(len(refs), desc, unit="task") as bar:
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1, timeout=conf.timeout_s)
            if not done:
                raise TimeoutError(f"{desc}: no task finished in ray.timeout_s={conf.timeout_s:g} s ({len(waiting)} "
                                   f"of {len(refs)} left; cluster {describe_nodes(live_nodes())})")
            results[index[done[0]]] = ray.get(done[0], timeout=conf.timeout_s)
            bar.update(1)
    return results
