"""Flow `causal-trace`: Meng et al. (2022), "Locating and Editing Factual Associations in GPT" (ROME), section 2.

  1. facts (shipped or causal_trace.facts_file) -> the model actors answer each; keep those answered right;
  2. per fact, on the model actors: corrupt the subject's embeddings with seeded noise, restore one clean state
     (residual stream at each (layer, position); MLP / attention outputs over a window of layers) and record
     P(answer); one stage item per fact under store.root, so a killed run resumes and a rerun recomputes nothing;
  3. average indirect effects at the paper's token groups -> per-layer curves (step = layer), heatmaps, summary.
"""

from __future__ import annotations

from prefect import flow

from lensflow.flows import stage
from lensflow.tasks.causal_trace import EXPERIMENT, tracing
from lensflow.tasks.causal_trace.facts import load_facts
from lensflow.tasks.causal_trace.report import average_effects, log_results, peaks
from lensflow.tasks.core.session import open_session
from lensflow.tasks.registry import load_config

find_known = stage(tracing.find_known)
trace_facts = stage(tracing.trace_facts)


@flow(name=EXPERIMENT.name, log_prints=True)
def causal_trace_flow(config: str = "conf/default.yaml", overrides: list[str] | None = None) -> dict:
    conf = load_config(config, overrides)
    facts = load_facts(conf.causal_trace.facts_file)  # bad fact files fail here, before a run or actor exists
    with open_session(conf, EXPERIMENT.name) as s:
        known = find_known(conf, facts, s.pool)
        traced = trace_facts(conf, known.facts, s.pool)
        ae = average_effects(traced.traces)
        text = log_results(s.run, s.info.name, known, traced, ae)
    print(text)
    print(f"traces: {traced.url} ({traced.computed} computed, {len(traced.traces) - traced.computed} found)")
    print(f"MLflow run: {s.run.run_id} (experiment '{conf.tracking.experiment}')")
    return {"run_id": s.run.run_id, "n_facts": known.n_facts, "n_correct": known.n_correct,
            "stage": traced.url, **traced.metrics(), "clean_prob": ae.clean, "corrupted_prob": ae.corrupted,
            "aie": {s: m.tolist() for s, m in ae.aie.items()}, "counts": ae.counts,
            "peaks": [p.__dict__ for p in peaks(ae)]}
