"""Flow `extract`: prompts -> Ray model actors -> zarr activation store, logged to MLflow."""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from lensflow.tasks import extraction, tracking
from lensflow.tasks.actors import ModelPool
from lensflow.tasks.config import Config, load_config
from lensflow.tasks.data import load_prompts
from lensflow.tasks.models import prepare


@task(retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def extract_activations(conf: Config, texts: list[str], pool: ModelPool, label: str = "prompts") -> tuple[str, dict]:
    """A retry resumes: chunks already marked done in the store are not recomputed."""
    return extraction.extract(conf, texts, pool, label)


def log_extraction(run: tracking.RunRef, url: str, stats: dict, label: str = "prompts") -> None:
    """The store URI, model identity and throughput, the same way for every flow that extracts."""
    tracking.tag_model(run, stats["model"])
    tracking.set_tags(run, {f"store.{label}": url})
    tracking.log_metrics(run, {f"extract.{label}.{k}": v for k, v in stats.items() if isinstance(v, (int, float))})


@flow(name="extract", log_prints=True)
def extract_flow(config: str = "conf/default.yaml", overrides: list[str] | None = None) -> dict:
    conf = load_config(config, overrides)
    texts = load_prompts(conf.data)  # bad or empty inputs fail here, before a store or run exists
    prepare(conf.model)
    with tracking.flow_run(conf, "extract") as run, ModelPool(conf) as pool:
        url, stats = extract_activations(conf, texts, pool)
        log_extraction(run, url, stats)
    print(f"store: {url}")
    print(f"MLflow run: {run.run_id} at {run.tracking_uri} (experiment '{conf.tracking.experiment}')")
    print(f"{stats['n_prompts']} prompts, {stats['chunks_computed']} chunks computed, {stats['chunks_resumed']} resumed, "
          f"{stats['tokens_per_s']:.0f} tokens/s")
    return {"store": url, "run_id": run.run_id, **{k: v for k, v in stats.items() if k != "model"}}
