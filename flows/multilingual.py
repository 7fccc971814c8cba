"""Flow `multilingual`: do translations of a paragraph light up the same features, and where in depth?

After Anthropic's "On the Biology of a Large Language Model" (2025): per-layer SAEs trained on general text plus
paragraphs of every compared language that are never measured, then the Jaccard overlap of the feature sets active
in a paragraph and in its translation, against unrelated paragraphs of the same language pair
(tasks/multilingual/overlap.py); the same on raw MLP neurons (tasks/multilingual/neurons.py); then feature pages of
every layer's SAE (tasks/multilingual/features.py); and per block the core's transcoders, measured per language and for
overlap in their basis (tasks/multilingual/transcoders.py). Every stage is found again under store.root: a rerun computes
nothing, and a killed run keeps every finished layer's SAE.
"""

from __future__ import annotations

import time

from prefect import flow

from lensflow.flows import stage
from lensflow.flows.extract import extract_activations
from lensflow.tasks.core import tracking
from lensflow.tasks.core.session import open_session
from lensflow.tasks.multilingual import EXPERIMENT, features, neurons, plan
from lensflow.tasks.multilingual.report import log_results
from lensflow.tasks.registry import load_config

neuron_overlaps = stage(neurons.neuron_overlaps)
sae_layers = stage(plan.sae_layers)
feature_pages = stage(features.build_pages)
transcoders_trained = stage(plan.train_transcoders)
transcoder_layers = stage(plan.transcoder_layers)


@flow(name=EXPERIMENT.name, log_prints=True)
def multilingual_flow(config: str = "conf/default.yaml", overrides: list[str] | None = None) -> dict:
    t0 = time.perf_counter()
    conf = plan.resolve_model(load_config(config, overrides))  # the section's model unless model.name is given
    inputs = plan.load_inputs(conf)  # bad inputs fail before any work
    with open_session(conf, EXPERIMENT.name) as s:
        # 1. model actors: general text, each language's SAE-training and measured paragraphs to the store; neurons
        layers = plan.choose_layers(conf.multilingual, s.info.n_layers)
        general_conf, paragraph_conf = plan.store_confs(conf, layers)
        general = extract_activations(general_conf, inputs.general, s.pool, "multilingual-general")
        sae_text = {lang: extract_activations(paragraph_conf, paras, s.pool, f"sae-train-{lang}")
                    for lang, paras in inputs.sae_text.items()}
        measured_conf = plan.measured_conf(conf, paragraph_conf)  # + MLP sites, for the transcoders
        paragraphs = {lang: extract_activations(measured_conf, paras, s.pool, f"parallel-{lang}")
                      for lang, paras in inputs.corpus.items()}
        neuron = neuron_overlaps(conf, s.pool, layers, inputs)
        blocks = plan.transcoder_blocks(layers, s.info.n_layers)
        transcoders_trained(conf, s.pool, s.info, inputs, blocks)  # transcoders read (mlp_in, mlp_out) via the model
        s.pool.close()  # every CPU free for the per-layer SAEs
        stores = {"multilingual-general": general, **{f"sae-train-{lang}": ex for lang, ex in sae_text.items()},
                  **{f"parallel-{lang}": ex for lang, ex in paragraphs.items()}}
        for label, ex in stores.items():
            tracking.log_extraction(s.run, ex, label)
        # 2. one Ray remote call per layer trains (or finds) its SAE and measures the overlaps on the stored paragraphs
        jobs = plan.sae_jobs(conf, s.info, general, sae_text, paragraphs, layers, inputs)
        results = sae_layers(conf, jobs)
        exported = plan.export_saelens(results, s.info)  # SAELens folders beside the stage items
        # ... and per block its transcoder's FVE per language and overlaps, on the stored paragraphs' MLP sites
        tc_results = transcoder_layers(conf, plan.transcoder_jobs(conf, s.info, inputs, paragraphs, blocks))
        # 3. feature pages of every layer's SAE on the measured paragraphs (one model actor, only if any is missing)
        pages = feature_pages(conf, plan.page_jobs(conf, results, paragraphs))
        # 4. metrics with step = layer (SAE: resid layer; neurons: MLP block, which writes into resid layer block + 1),
        #    a child run per SAE this run trained
        summary = log_results(s.run, s.info, stores, results, neuron, inputs, t0, pages, tc_results)
    print(summary.text())
    if exported:
        print(f"SAEs in the SAELens layout: {next(iter(exported.values())).rsplit('/', 1)[0]}")
    print(f"MLflow run: {s.run.run_id} (experiment '{conf.tracking.experiment}'); {summary.wall_s:.0f} s")
    return summary.as_dict(s.run.run_id)
