"""Flow `logit-lens`: the logit lens (nostalgebraist 2020) and the tuned lens (Belrose et al. 2023, "Eliciting
Latent Predictions from Transformers with the Tuned Lens"). Every stage is found again under store.root when its
inputs are unchanged (tasks/lenses/tuned_lens.py); a killed run resumes per store chunk and per layer.

  1. model actors: every residual layer at every position of the first lenses.max_prompts texts -> zarr store,
     the final norm + unembedding (readout), the states of lenses.grid_prompt;
  2. Ray remote functions, one per store chunk: the model's final distribution per token as lens targets;
  3. Ray remote functions, one per layer: train its affine translator on KL(final || lens) over the training
     prompts, then evaluate both lenses on the held-out prompts;
  4. MLflow (tasks/lenses/report.py): KL and top-1 agreement per layer (step = layer), curves, summary table, the
     translators as one artifact, a child run per trained layer, the grids of lenses.grid_prompt.
`lensflow lens --lens logit|tuned "prompt"` draws the grid for any prompt (tasks/lenses/report.py).
"""

from __future__ import annotations

import time

import ray
from prefect import flow

from lensflow.flows import stage
from lensflow.tasks.core import extraction, tracking
from lensflow.tasks.core.prompts import load_prompts
from lensflow.tasks.core.session import open_session
from lensflow.tasks.lenses import EXPERIMENT, report, tuned_lens
from lensflow.tasks.lenses.readouts import prompt_states, readout_of
from lensflow.tasks.registry import load_config

extract_all_positions = stage(extraction.extract)
lens_targets = stage(tuned_lens.lens_targets)
lens_layers = stage(tuned_lens.lens_layers)


@flow(name=EXPERIMENT.name, log_prints=True)
def logit_lens_flow(config: str = "conf/default.yaml", overrides: list[str] | None = None) -> dict:
    t_start = time.perf_counter()
    conf = tuned_lens.lens_config(load_config(config, overrides))
    texts = load_prompts(conf.data)  # bad or empty inputs fail here, before a store or run exists
    rows = tuned_lens.split(len(texts), conf.lenses.heldout)
    with open_session(conf, EXPERIMENT.name) as s:
        ex = extract_all_positions(conf, texts, s.pool, label="lenses")
        readout = s.pool.map(readout_of, [None], desc="final norm + unembedding")[0]
        grid = s.pool.map(prompt_states, [conf.lenses.grid_prompt], desc="grid prompt")[0]
        s.pool.close()  # the actors' CPUs are free: model-free Ray remote functions from here on
        extract_s = time.perf_counter() - t_start
        tracking.log_extraction(s.run, ex, "lenses")
        stages = tuned_lens.lens_stages(conf, ex.key, rows)
        readout_ref = ray.put(readout)  # shared by every remote function below, sent once
        targets = lens_targets(conf, stages, ex.url, s.info.n_layers, readout_ref)
        layers = lens_layers(conf, stages, ex.url, s.info.n_layers, readout_ref, targets)
        lens_report = report.log_lenses(s.run, conf, stages, targets, layers, readout, grid, t_start, extract_s)
    print(lens_report.text(s.run.run_id))
    return lens_report.result(s.run.run_id, ex.url)
