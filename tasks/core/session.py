"""What every flow does around its stages, in one place: check the model, wait for the cluster's GPUs when runs share
it, open the flow's MLflow run, start the model actors, and tag the run with the model they hold. A flow then reads
as its stages."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import ContextManager

from lensflow.tasks.core import tracking
from lensflow.tasks.core.actors import ModelPool
from lensflow.tasks.core.config import Config, RayConf
from lensflow.tasks.core.models import ModelInfo, prepare


@dataclass(frozen=True)
class Session:
    run: tracking.RunRef
    pool: ModelPool  # `pool.close()` frees the actors' CPUs for model-free Ray tasks before the run ends
    info: ModelInfo


def gpus_wanted(rc: RayConf) -> float:
    """The most GPUs a run's actors may take (ray.actors=auto: ray.max_actors of them, as the pool may grow that
    far); 0 where gpus_per_actor is auto. Holding the most keeps a second run from starting on a cluster the first
    has filled (it would find no free GPU for its actors)."""
    per_actor = 0.0 if rc.gpus_per_actor == "auto" else float(rc.gpus_per_actor)
    return per_actor * (rc.max_actors if rc.actors == "auto" else rc.actors)


def gpu_slots(rc: RayConf) -> ContextManager[object]:
    """ray.gpu_limit: hold this run's GPUs in Prefect's global concurrency limit while it runs, so a second scheduled
    run waits for the first instead of failing on a full cluster after ray.timeout_s."""
    occupy = int(round(gpus_wanted(rc)))
    if not rc.gpu_limit or occupy == 0:
        return nullcontext()
    from prefect.concurrency.sync import concurrency

    return concurrency(rc.gpu_limit, occupy=occupy, timeout_seconds=rc.timeout_s, strict=True)


@contextmanager
def open_session(conf: Config, flow: str, work_items: int | None = None) -> Iterator[Session]:
    """work_items: where a flow knows it has fewer items than ray.actors (a 2-prompt extract has one chunk), no more
    actors start: each would load the model on CPUs the first one needs."""
    prepare(conf.model)  # unmappable models fail, and the embedded GGUF converts once, before any actor starts
    size = None if work_items is None or conf.ray.actors == "auto" else max(1, min(int(conf.ray.actors), work_items))
    with gpu_slots(conf.ray), ModelPool(conf, size) as pool, tracking.flow_run(conf, flow) as run:  # actors load meanwhile
        info = pool.describe()
        yield Session(run, pool, info)
        # tagged once the stages are done: a tracking outage then fails the run after its work is in the store
        tracking.tag_model(run, info)
