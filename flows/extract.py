"""Flow `extract`: prompts -> Ray model actors -> zarr activation store, logged to MLflow."""

from __future__ import annotations

from prefect import flow

from lensflow.flows import stage
from lensflow.tasks.core import extraction, tracking
from lensflow.tasks.core.prompts import load_prompts
from lensflow.tasks.core.session import open_session
from lensflow.tasks.registry import EXTRACT, load_config

extract_activations = stage(extraction.extract)


@flow(name=EXTRACT.name, log_prints=True)
def extract_flow(config: str = "conf/default.yaml", overrides: list[str] | None = None) -> dict:
    conf = load_config(config, overrides)
    texts = load_prompts(conf.data)  # bad or empty inputs fail here, before a store or run exists
    with open_session(conf, EXTRACT.name, work_items=-(-len(texts) // conf.store.chunk_size)) as s:
        ex = extract_activations(conf, texts, s.pool)
        tracking.log_extraction(s.run, ex, "prompts")
    print(f"store: {ex.url}")
    print(f"MLflow run: {s.run.run_id} (experiment '{conf.tracking.experiment}')")
    print(f"{ex.n_prompts} prompts, {ex.chunks_computed} chunks computed, {ex.chunks_resumed} resumed, "
          f"{ex.tokens_per_s:.0f} tokens/s")
    return {"store": ex.url, "run_id": s.run.run_id, **ex.metrics()}
