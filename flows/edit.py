"""Flow `edit`: ROME (Meng et al. 2022) and MEMIT (Meng et al. 2023) on CounterFact-style requests.

  1. requests (shipped, or edit.requests) -> ROME's layer from a finished causal-trace stage, else edit.layer;
  2. on the model actors: the key covariance of every edited layer over the built-in text set (a stage);
  3. ROME: one rank-one delta per request (a stage item each), applied alone in the actor, scored, removed;
  4. MEMIT: target values per request, then one batch of deltas over edit.memit_layers per size in
     edit.memit_sizes (1, 10, 100), each applied, scored, removed;
  5. efficacy, paraphrase, specificity and fluency of each beside the unedited model's: metrics, figure, table.
"""

from __future__ import annotations

from prefect import flow

from lensflow.flows import stage
from lensflow.tasks.core.session import open_session
from lensflow.tasks.editing import EXPERIMENT, pipeline
from lensflow.tasks.editing.report import log_results
from lensflow.tasks.editing.requests import load_requests
from lensflow.tasks.registry import load_config

covariances = stage(pipeline.covariances)
rome = stage(pipeline.rome)
memit = stage(pipeline.memit)


@flow(name=EXPERIMENT.name, log_prints=True)
def edit_flow(config: str = "conf/default.yaml", overrides: list[str] | None = None) -> dict:
    conf = load_config(config, overrides)
    EXPERIMENT.check_inputs(conf)  # bad requests or layers fail here, before a run or actor exists
    requests = load_requests(conf.edit.requests)
    ec = conf.edit
    with open_session(conf, EXPERIMENT.name) as s:
        plan = pipeline.Plan.of(conf, s.info.id)
        layer, source = pipeline.rome_layer(conf, s.info.id, s.info.n_layers)
        memit_layers = ec.memit_layer_list(s.info.n_layers)
        covariances(plan, [layer, *memit_layers], s.pool)
        runs = [rome(plan, requests[:ec.rome_edits], layer, s.pool)] if ec.rome_edits else []
        runs += memit(plan, requests, memit_layers, ec.memit_sizes, s.pool)
        text = log_results(s.run, s.info.name, runs, source)
    print(text)
    print(f"MLflow run: {s.run.run_id} (experiment '{conf.tracking.experiment}')")
    return {"run_id": s.run.run_id, "rome_layer": layer, "layer_source": source,
            "runs": [{"method": r.method, "n_edits": r.n_edits, "edited": r.edited.metrics(),
                      "unedited": r.unedited.metrics()} for r in runs]}
