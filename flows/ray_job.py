"""A lensflow run submitted as a Ray job: the driver runs inside the cluster (on the head), so a scheduled seven-hour
run does not hang on a Ray Client connection. The Prefect flow run (a pod of infra/prefect-k8s-job-template.json,
or any process worker) only submits it through the head's Jobs API and follows it to the end."""

from __future__ import annotations

import os
import shlex
import time

from prefect import flow, get_run_logger

from lensflow.tasks.core.config import ConfigError
from lensflow.tasks.core.redact import redact

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def entrypoint(experiment: str, config: str, overrides: list[str]) -> str:
    """The job's command line. It is shown by the dashboard and the Jobs API: a credential in an override is
    refused (the driver reads credentials from the head's environment: the cluster's Secret)."""
    secret = [o.split("=", 1)[0] for o in overrides if redact(o) != o]
    if secret:
        raise ConfigError(f"overrides {', '.join(secret)}: hold a credential, which a Ray job's entrypoint would show; "
                          "put it in the cluster's credentials Secret (MLFLOW_TRACKING_PASSWORD, AWS_*, HF_TOKEN)")
    sets = [a for o in overrides for a in ("--set", o)]
    return shlex.join(["lensflow", "run", experiment, "--config", config, "--set", "ray.address=auto", *sets])


@flow(name="ray-job")
def ray_job_flow(experiment: str = "extract", config: str = "gptj-6b.yaml", overrides: list[str] | None = None,
                 address: str = "http://lensflow-head-svc:8265", poll_s: float = 30.0) -> str:
    """Submit `lensflow run EXPERIMENT` to the cluster at `address` (its Jobs API; token auth from RAY_AUTH_MODE /
    RAY_AUTH_TOKEN in this environment) and wait for it; fails when the job does."""
    from ray.job_submission import JobSubmissionClient

    log = get_run_logger()
    client = JobSubmissionClient(address)
    # the driver reports to this Prefect server (its flow run, ray.gpu_limit's slots): a URL, never a key
    api = {k: os.environ[k] for k in ("PREFECT_API_URL",) if os.environ.get(k) and redact(os.environ[k]) == os.environ[k]}
    job_id = client.submit_job(entrypoint=entrypoint(experiment, config, overrides or []),
                               runtime_env={"env_vars": api})
    log.info("Ray job %s submitted to %s", job_id, address)
    while (status := str(client.get_job_status(job_id)).rsplit(".", 1)[-1]) not in TERMINAL:
        time.sleep(poll_s)
    tail = client.get_job_logs(job_id)[-4000:]
    if status != "SUCCEEDED":
        raise RuntimeError(f"Ray job {job_id} ended {status}:\n{tail}")
    log.info("Ray job %s succeeded:\n%s", job_id, tail)
    return job_id
