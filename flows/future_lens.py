"""Flow `future-lens`: Pal et al. (CoNLL 2023), "Future Lens: Anticipating Subsequent Tokens from a Single
Hidden State". Each stage is published under store.root (keys: tasks/future_lens.py): a rerun recomputes nothing,
a killed run resumes per layer.
  1. targets (actors): model-correct prefixes of data.* texts, the model's continuation, split by text;
  2. every layer's state at T (the activation store);  3. the n-gram baseline; per source layer the learned and
     fixed prompts and the linear approximation (actors), then the vocabulary probes (Ray remote functions);
  4. Precision@k / surprisal per (method, layer, N) to MLflow (step = layer), Figure 4, the summary table.
`render_grid` (tasks/future_lens_grid.py): the layer x token grid of one prompt from a run's soft prompts.
"""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow

from lensflow.flows import stage
from lensflow.tasks import extraction, future_lens as fl, future_lens_report as report, future_lens_samples as samples
from lensflow.tasks import tracking
from lensflow.tasks.actors import ModelPool
from lensflow.tasks.config import load_config
from lensflow.tasks.data import load_prompts
from lensflow.tasks.future_lens_grid import render_grid  # noqa: F401  (`lensflow lens`)
from lensflow.tasks.models import prepare

make_targets = stage(samples.make_targets)
extract_states = stage(extraction.extract)
ngram_baseline = stage(fl.ngram_baseline)
on_actors = stage(fl.on_actors)
on_workers = stage(fl.on_workers)


@flow(name="future-lens", log_prints=True)
def future_lens_flow(config: str = "conf/default.yaml", overrides: list[str] | None = None) -> dict:
    conf = load_config(config, overrides)
    texts = load_prompts(conf.data)
    prepare(conf.model)
    clock = report.Clock()
    with tracking.flow_run(conf, "future-lens") as run:
        with ModelPool(conf) as pool:
            info = pool.describe()
            tracking.tag_model(run, info)
            with clock("prepare_s"):
                targets = make_targets(conf, texts, pool)
            with clock("extract_s"):
                ex = extract_states(samples.states_conf(conf), targets.prefixes(), pool, "future_lens")
            plan = fl.plan(conf, info, targets, ex, run)
            report.log_inputs(run, targets, ex, plan)
            with clock("ngram_s"):
                ngram = ngram_baseline(plan, texts, pool)
            with clock("soft_prompt_s"):
                soft = on_actors(pool, fl.soft_prompt_job, plan.jobs["soft_prompt"])
            with clock("fixed_prompt_s"):
                fixed = on_actors(pool, fl.fixed_prompt_job, plan.jobs["fixed_prompt"])
            with clock("linear_hidden_s"):
                hidden = on_actors(pool, fl.linear_hidden_job, plan.jobs["linear_hidden"])
        with clock("linear_vocab_s"):  # the actors' CPUs are free again
            vocab = on_workers(conf.ray, fl.linear_vocab_job, plan.jobs["linear_vocab"])
        results = fl.assemble(plan, ngram, [*soft, *fixed, *hidden, *vocab])  # fixed_prompt: the best prompt
        summary = report.log_run(run, conf, targets, ex, results, clock)
    print(f"{summary.table}\nMLflow run: {run.run_id}; computed: {summary.computed}; timings: {summary.timings}")
    return asdict(summary)
