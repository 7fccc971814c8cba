"""Flow `future-lens`: Pal et al. (CoNLL 2023), "Future Lens: Anticipating Subsequent Tokens from a Single
Hidden State". Each stage is published under store.root (keys: tasks/future_lens/methods.py): a rerun recomputes nothing,
a killed run resumes per layer.
  1. targets (actors): model-correct prefixes of data.* texts, the model's continuation, split by text;
  2. every layer's state at T (the activation store);  3. the n-gram baseline; per source layer the learned and
     fixed prompts and the linear approximation (actors), then the vocabulary probes (Ray remote functions);
  4. Precision@k / surprisal per (method, layer, N) to MLflow (step = layer), Figure 4, the summary table.
`lensflow lens --lens future` (tasks/future_lens/grid.py): the layer x token grid of one prompt from a run's
soft prompts.
"""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow

from lensflow.flows import stage
from lensflow.tasks.core import extraction
from lensflow.tasks.core.prompts import load_prompts
from lensflow.tasks.core.session import open_session
from lensflow.tasks.future_lens import EXPERIMENT, methods, report, samples
from lensflow.tasks.registry import load_config

make_targets = stage(samples.make_targets)
extract_states = stage(extraction.extract)
ngram_baseline = stage(methods.ngram_baseline)
on_actors = stage(methods.on_actors)
on_workers = stage(methods.on_workers)


@flow(name=EXPERIMENT.name, log_prints=True)
def future_lens_flow(config: str = "conf/default.yaml", overrides: list[str] | None = None) -> dict:
    conf = load_config(config, overrides)
    texts = load_prompts(conf.data)
    clock = report.Clock()
    with open_session(conf, EXPERIMENT.name) as s:
        with clock("prepare_s"):
            targets = make_targets(conf, texts, s.pool)
        with clock("extract_s"):
            ex = extract_states(samples.states_conf(conf), targets.prefixes(), s.pool, "future_lens")
        plan = methods.plan(conf, s.info, targets, ex)
        report.log_inputs(s.run, targets, ex, plan)
        with clock("ngram_s"):
            ngram = ngram_baseline(plan, texts, s.pool)
        with clock("actor_methods_s"):  # soft and fixed prompts, linear_hidden
            per_layer = on_actors(s.pool, [j for m in methods.ACTOR_METHODS for j in plan.jobs[m]])
        s.pool.close()  # the actors' CPUs are free for the model-free probes
        with clock("linear_vocab_s"):
            vocab = on_workers(conf.ray, methods.linear_vocab_job, plan.jobs["linear_vocab"])
        results = methods.assemble(plan, ngram, [*per_layer, *vocab])  # fixed_prompt: the best prompt
        report.log_layers(s.run, plan)
        summary = report.log_run(s.run, conf, targets, ex, results, clock)
    print(f"{summary.table}\nMLflow run: {s.run.run_id}; computed: {summary.computed}; timings: {summary.timings}")
    return asdict(summary)
