"""Flow `extract`: prompts -> Ray model actors -> zarr activation store, logged to MLflow."""

from __future__ import annotations

from prefect import flow

from lensflow.flows import stage
from lensflow.tasks import extraction, tracking
from lensflow.tasks.actors import ModelPool
from lensflow.tasks.config import load_config
from lensflow.tasks.data import load_prompts
from lensflow.tasks.models import prepare

extract_activations = stage(extraction.extract)


@flow(name="extract", log_prints=True)
def extract_flow(config: str = "conf/default.yaml", overrides: list[str] | None = None) -> dict:
    conf = load_config(config, overrides)
    texts = load_prompts(conf.data)  # bad or empty inputs fail here, before a store or run exists
    prepare(conf.model)
    with tracking.flow_run(conf, "extract") as run, ModelPool(conf) as pool:
        ex = extract_activations(conf, texts, pool)
        tracking.tag_model(run, pool.describe())
        tracking.log_extraction(run, ex, "prompts")
    print(f"store: {ex.url}")
    print(f"MLflow run: {run.run_id} (experiment '{conf.tracking.experiment}')")
    print(f"{ex.n_prompts} prompts, {ex.chunks_computed} chunks computed, {ex.chunks_resumed} resumed, "
          f"{ex.tokens_per_s:.0f} tokens/s")
    return {"store": ex.url, "run_id": run.run_id, **ex.metrics()}
