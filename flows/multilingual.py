"""Flow `multilingual`: do translations of a paragraph light up the same features, and where in depth?

After Anthropic's "On the Biology of a Large Language Model" (2025): per-layer SAEs trained on general text plus
paragraphs of every compared language that are never measured, then the Jaccard overlap of the feature sets active
in a paragraph and in its translation, against unrelated paragraphs of the same language pair (tasks/overlap.py);
the same on raw MLP neurons (tasks/neurons.py). Every stage is found again under store.root: a rerun computes
nothing, and a killed run keeps every finished layer's SAE.
"""

from __future__ import annotations

import time

from prefect import flow

from lensflow.flows import stage
from lensflow.flows.extract import extract_activations
from lensflow.tasks import multilingual_plan as plan
from lensflow.tasks import neurons, tracking
from lensflow.tasks.actors import ModelPool
from lensflow.tasks.config import load_config
from lensflow.tasks.models import prepare
from lensflow.tasks.multilingual_report import log_results

neuron_overlaps = stage(neurons.neuron_overlaps)
sae_layers = stage(plan.sae_layers)


@flow(name="multilingual", log_prints=True)
def multilingual_flow(config: str = "conf/default.yaml", overrides: list[str] | None = None) -> dict:
    t0 = time.perf_counter()
    conf = load_config(config, overrides)
    inputs = plan.load_inputs(conf)  # bad inputs fail before any work
    prepare(conf.model)
    with tracking.flow_run(conf, "multilingual") as run:
        # 1. model actors: general text, each language's SAE-training and measured paragraphs to the store; neurons
        with ModelPool(conf) as pool:
            info = pool.describe()
            tracking.tag_model(run, info)
            layers = plan.choose_layers(conf.multilingual, info.n_layers)
            general_conf, paragraph_conf = plan.store_confs(conf, layers)
            general = extract_activations(general_conf, inputs.general, pool, "multilingual-general")
            sae_text = {lang: extract_activations(paragraph_conf, paras, pool, f"sae-train-{lang}")
                        for lang, paras in inputs.sae_text.items()}
            paragraphs = {lang: extract_activations(paragraph_conf, paras, pool, f"parallel-{lang}")
                          for lang, paras in inputs.corpus.items()}
            neuron = neuron_overlaps(conf, pool, layers, inputs)
        stores = {"multilingual-general": general, **{f"sae-train-{lang}": ex for lang, ex in sae_text.items()},
                  **{f"parallel-{lang}": ex for lang, ex in paragraphs.items()}}
        for label, ex in stores.items():
            tracking.log_extraction(run, ex, label)
        # 2. actors gone, every CPU free: one Ray remote call per layer trains (or finds) its SAE, logs a child run
        #    with the loss curve and the SAE, and measures the overlaps on the stored paragraphs
        jobs = plan.sae_jobs(conf, info, general, sae_text, paragraphs, layers, inputs, run)
        results = sae_layers(conf, jobs)
        # 3. metrics with step = layer (SAE: resid layer; neurons: MLP block, which writes into resid layer block + 1)
        summary = log_results(run, info, stores, results, neuron, inputs, t0)
    print(summary.text())
    print(f"MLflow run: {run.run_id} (experiment '{conf.tracking.experiment}'); "
          f"{summary.wall_s:.0f} s")
    return summary.as_dict(run.run_id)
