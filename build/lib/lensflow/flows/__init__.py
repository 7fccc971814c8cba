"""Prefect flows, one module per experiment. Each flow is the experiment's outline: the stages it runs (typed
functions in lensflow.tasks), in which order, on which resources, and what it logs. Which flows exist, and under
which names, is lensflow.tasks.registry's table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from lensflow.tasks.core.config import ConfigError


def _retryable(task_, task_run, state) -> bool:
    """A config error is deterministic: a retry would only redo the work that came before it."""
    return not isinstance(state.data, ConfigError)


def stage(fn: Callable[..., Any], retries: int = 1) -> Any:
    """A stage function of lensflow.tasks as a Prefect task. Stage outputs are found again by their fingerprint
    under store.root, so Prefect's own result cache stays off (hashing a tensor argument costs seconds), and a
    retry resumes where the failed try stopped."""
    return task(fn, name=fn.__name__.replace("_", "-"), cache_policy=NO_CACHE, retries=retries,
                retry_delay_seconds=5, retry_condition_fn=_retryable)
