"""The `extract` Prefect flow end to end on a tiny model: store plus what it logs to MLflow."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from lensflow.flows.extract import extract_flow
from lensflow.tasks.core import store
from lensflow.tasks.core.metric_names import metric_key


def test_extract_flow_logs_run(ray_session, prefect_harness, tmp_path, tracking_uri):
    overrides = ["model.name=tiny-gpt2", f"store.root={tmp_path}", f"tracking.uri={tracking_uri}", "ray.actors=1",
                 "data.max_prompts=20", "data.max_tokens=16", "store.chunk_size=8"]
    out = extract_flow(config="conf/default.yaml", overrides=overrides)
    acts = store.Activations(out["store"])
    assert acts.n == 20 and acts.attrs["complete"] and acts.attrs["model"] == "tiny-gpt2"
    run = MlflowClient(tracking_uri).get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "tiny-gpt2" and run.data.params["store.chunk_size"] == "8"
    assert run.data.tags["store.prompts"] == out["store"]
    assert run.data.tags["model.weights_hash"] == acts.attrs["weights_hash"]
    assert len(run.data.tags["mlflow.source.git.commit"]) >= 7
    assert run.data.metrics[metric_key("extract.prompts.n_prompts")] == 20 and run.data.metrics[metric_key("extract.prompts.chunks_computed")] == 3
    assert run.data.metrics[metric_key("extract.prompts.tokens_per_s")] > 0

    again = extract_flow(config="conf/default.yaml", overrides=overrides)  # same config: nothing recomputed
    assert again["store"] == out["store"] and again["chunks_computed"] == 0 and again["chunks_resumed"] == 3
