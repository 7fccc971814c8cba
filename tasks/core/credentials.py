"""Credentials for the store, the tracking server and the Hub reach every Ray worker from the driver's environment,
by value in Ray's object store, never through the job's runtime_env.

Why not `runtime_env={"env_vars": ...}`: Ray records a job's runtime_env (and its driver's command line as the
job's entrypoint) in the GCS job table, which the dashboard and the Jobs API show to anyone holding the cluster
token. An object in the object store is shown nowhere; each model actor and Ray task gets the bundle as an argument
and sets the variables in its own process before any work. A variable the node already has (a KubeRay pod's
mounted Secret, an instance profile's region) wins over the driver's value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from lensflow.tasks.core.redact import redact

# What the store (s3fs/botocore, adlfs), the tracking server (MLflow's REST client) and the Hub read, by name
KNOWN = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION", "AWS_REGION",
    "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_CONNECTION_STRING",
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT",
)
# A name a user adds to ray.env_vars that looks like a secret travels this way too, not in the runtime_env
SECRET_NAME = re.compile(r"PASSWORD|SECRET|CREDENTIAL|CONNECTION_STRING|(^|_)(TOKEN|KEY|PASS)($|_)")


def is_secret(name: str) -> bool:
    return name in KNOWN or bool(SECRET_NAME.search(name))


class Bundle:
    """Variable name -> value; its repr names the variables only (a bundle in a traceback shows no value)."""

    def __init__(self, values: dict[str, str]):
        self.values = dict(values)

    def __repr__(self) -> str:
        return f"Bundle({', '.join(sorted(self.values))})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bundle) and other.values == self.values


def collect(extra: Iterable[str] = ()) -> Bundle:
    """The driver's credentials: every KNOWN variable it has, and the secret-looking names of `extra`
    (ray.env_vars)."""
    names = [*KNOWN, *(n for n in extra if is_secret(n))]
    return Bundle({n: os.environ[n] for n in names if os.environ.get(n)})


def split_env_vars(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """ray.env_vars as (plain names for the runtime_env, secret names for the bundle)."""
    names = list(names)
    return [n for n in names if not is_secret(n)], [n for n in names if is_secret(n)]


def apply(bundle: Bundle | None) -> None:
    """In a worker: set each variable the process does not have yet (the node's own value wins)."""
    if bundle is None:
        return
    for name, value in bundle.values.items():
        os.environ.setdefault(name, value)


@contextmanager
def redacted_entrypoint() -> Iterator[None]:
    """While ray.init runs: the job's entrypoint (this process's command line, e.g. `lensflow run ... --set
    tracking.uri=https://user:password@host`) is recorded redacted. Ray reads it through this private helper; if a
    later Ray moves it, the patch is a no-op and the command line is recorded as before."""
    import ray._private.utils as ray_utils

    original: Any = getattr(ray_utils, "get_entrypoint_name", None)
    if original is None:
        yield
        return
    ray_utils.get_entrypoint_name = lambda: redact(original())
    try:
        yield
    finally:
        ray_utils.get_entrypoint_name = original
