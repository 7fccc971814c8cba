"""Prefect flows, one module per experiment. Each flow is the experiment's outline: the stages it runs (typed
functions in lensflow.tasks), in which order, on which resources, and what it logs. Which flows exist, and under
which names, is lensflow.tasks.registry's table."""

from __future__ import annotations

import os

# Set before Prefect and MLflow are first imported (this package is, before the CLI module): Prefect reads its
# settings once, at import. Prefect itself is imported where it is used: the `lensflow` command starts Ray first.
# No analytics calls from a closed network, and room for a slow first start.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# MLflow's HTTP client retries 7 times with back-off factor 2 and a 120 s timeout: minutes before a dead tracking
# server is reported. 3 tries at 0, 2 and 4 s (plus jitter) fail a dead server in under 10 s.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0.5")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

from collections.abc import Callable
from typing import Any

from lensflow.tasks.core.config import ConfigError


def _retryable(task_, task_run, state) -> bool:
    """A config error is deterministic: a retry would only redo the work that came before it."""
    return not isinstance(state.data, ConfigError)


def stage(fn: Callable[..., Any], retries: int = 1) -> Any:
    """A stage function of lensflow.tasks as a Prefect task. Stage outputs are found again by their fingerprint
    under store.root, so Prefect's own result cache stays off (hashing a tensor argument costs seconds), and a
    retry resumes where the failed try stopped."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(fn, name=fn.__name__.replace("_", "-"), cache_policy=NO_CACHE, retries=retries,
                retry_delay_seconds=5, retry_condition_fn=_retryable)
