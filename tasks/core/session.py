"""What every flow does around its stages, in one place: check the model, open the flow's MLflow run, start the
model actors, and tag the run with the model they hold. A flow then reads as its stages."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from lensflow.tasks.core import tracking
from lensflow.tasks.core.actors import ModelPool
from lensflow.tasks.core.config import Config
from lensflow.tasks.core.models import ModelInfo, prepare


@dataclass(frozen=True)
class Session:
    run: tracking.RunRef
    pool: ModelPool  # `pool.close()` frees the actors' CPUs for model-free Ray tasks before the run ends
    info: ModelInfo


@contextmanager
def open_session(conf: Config, flow: str) -> Iterator[Session]:
    prepare(conf.model)  # unmappable models fail, and the embedded GGUF converts once, before any actor starts
    with ModelPool(conf) as pool, tracking.flow_run(conf, flow) as run:  # the actors load while the run opens
        info = pool.describe()
        yield Session(run, pool, info)
        # tagged once the stages are done: a tracking outage then fails the run after its work is in the store
        tracking.tag_model(run, info)
