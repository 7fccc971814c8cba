"""Flow `function-vectors`: Todd et al. (ICLR 2024), "Function Vectors in Large Language Models".

  1. per ICL task, on the model actors: mean head outputs on clean n-shot prompts and the indirect effect of
     patching each head with its mean into shuffled-label prompts (one stage item per ICL task);
  2. average indirect effect over ICL tasks -> the top-k heads; an ICL task's function vector is the sum of those
     heads' mean outputs through the attention output projection;
  3. layer=auto: the resid layer where the vector works best on the ICL tasks' VALIDATION queries;
  4. per ICL task, on the test queries: accuracy with / without the vector at that layer (zero-shot, shuffled
     labels, natural-text templates) and a layer sweep;
  5. per directed transfer source->target: the target's zero-shot accuracy with its own and with the source's vector.
Every stage item is found again under store.root: a rerun computes nothing, a new top_k only re-evaluates.
"""

from __future__ import annotations

import time

from prefect import flow

from lensflow.flows import stage
from lensflow.tasks import fv_choices, fv_eval, fv_report, fv_sweep, tracking
from lensflow.tasks.actors import ModelPool
from lensflow.tasks.config import load_config
from lensflow.tasks.models import prepare

sweep_icl_tasks = stage(fv_sweep.sweep_icl_tasks)
validation_layer_sweeps = stage(fv_eval.validation_layer_sweeps)
evaluate_icl_tasks = stage(fv_eval.evaluate_icl_tasks)
evaluate_transfers = stage(fv_eval.evaluate_transfers)


@flow(name="function-vectors", log_prints=True)
def function_vectors_flow(config: str = "conf/default.yaml", overrides: list[str] | None = None) -> dict:
    t0 = time.perf_counter()
    conf = load_config(config, overrides)
    fc = conf.function_vectors
    icl = fv_sweep.load_icl_tasks(fc)  # unknown ICL tasks and bad task files fail here, before any run or actor
    prepare(conf.model)
    with tracking.flow_run(conf, "function-vectors") as run, ModelPool(conf) as pool:
        info = pool.describe()
        tracking.tag_model(run, info)
        plan = fv_choices.plan(fc, info)  # top_k and layer checked against the model before any work
        sweeps = sweep_icl_tasks(conf, icl.swept, pool)  # ICL tasks only a transfer names: head means only
        heads = fv_choices.top_heads(sweeps.only(icl.names).aie, plan.top_k)
        curves = validation_layer_sweeps(conf, icl.selected, sweeps, heads, plan.candidate_layers, pool) \
            if plan.layer is None else []
        choice = fv_choices.choose_layer(plan, curves, info.n_layers)
        evals = evaluate_icl_tasks(conf, icl.selected, sweeps, heads, choice.layer, plan.sweep_layers, pool)
        transfers = evaluate_transfers(conf, fv_choices.transfer_jobs(fc, icl, sweeps, heads, choice.layer), pool)
        result = fv_report.FvRun(info.name, sweeps, heads, choice, curves, evals, transfers, plan.sweep_layers)
        summary = fv_report.log_run(run, result, time.perf_counter() - t0)
    print(fv_report.table(evals, transfers))
    print(f"top-{plan.top_k} heads (layer, head): {heads}; FV added at resid layer {choice.layer} ({choice.how}); "
          f"stage items computed {summary['computed']} (the rest found under {conf.store.root})")
    print(f"MLflow run: {run.run_id} (experiment '{conf.tracking.experiment}'); {summary['wall_s']:.0f} s")
    return summary
