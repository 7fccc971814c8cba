"""Flow `function-vectors`: Todd et al. (ICLR 2024), "Function Vectors in Large Language Models".

  1. per ICL task, on the model actors: mean head outputs on clean n-shot prompts and the indirect effect of
     patching each head with its mean into shuffled-label prompts (one stage item per ICL task);
  2. average indirect effect over ICL tasks -> the top-k heads; an ICL task's function vector is the sum of those
     heads' mean outputs through the attention output projection;
  3. layer=auto: the resid layer where the vector works best on the ICL tasks' VALIDATION queries;
  4. per ICL task, on the test queries: accuracy with / without the vector at that layer (zero-shot, shuffled
     labels, natural-text templates) and a layer scan;
  5. per directed transfer source->target: the target's zero-shot accuracy with its own and with the source's vector.
Every stage item is found again under store.root: a rerun computes nothing, a new top_k only re-evaluates.
"""

from __future__ import annotations

import time

from prefect import flow

from lensflow.flows import stage
from lensflow.tasks.core.session import open_session
from lensflow.tasks.function_vectors import (
    EXPERIMENT,
    choices,
    evaluation,
    patching,
    report,
)
from lensflow.tasks.registry import load_config

patch_icl_tasks = stage(patching.patch_icl_tasks)
validation_layer_scans = stage(evaluation.validation_layer_scans)
evaluate_icl_tasks = stage(evaluation.evaluate_icl_tasks)
evaluate_transfers = stage(evaluation.evaluate_transfers)


@flow(name=EXPERIMENT.name, log_prints=True)
def function_vectors_flow(config: str = "conf/default.yaml", overrides: list[str] | None = None) -> dict:
    t0 = time.perf_counter()
    conf = load_config(config, overrides)
    fc = conf.function_vectors
    icl = patching.load_icl_tasks(fc)  # unknown ICL tasks and bad task files fail here, before any run or actor
    with open_session(conf, EXPERIMENT.name) as s:
        plan = choices.plan(fc, s.info)  # top_k and layer checked against the model before any work
        patchings = patch_icl_tasks(conf, icl.swept, s.pool)  # ICL tasks only a transfer names: head means only
        heads = choices.top_heads(patchings.only(icl.names).aie, plan.top_k)
        curves = validation_layer_scans(conf, icl.selected, patchings, heads, plan.candidate_layers, s.pool) \
            if plan.layer is None else []
        choice = choices.choose_layer(plan, curves, s.info.n_layers)
        evals = evaluate_icl_tasks(conf, icl.selected, patchings, heads, choice.layer, plan.scan_layers, s.pool)
        transfers = evaluate_transfers(conf, choices.transfer_jobs(fc, icl, patchings, heads, choice.layer), s.pool)
        result = report.FvRun(s.info.name, patchings, heads, choice, curves, evals, transfers, plan.scan_layers)
        wall_s = time.perf_counter() - t0
        summary = report.log_run(s.run, result, wall_s)
    print(report.table(evals, transfers))
    print(f"top-{plan.top_k} heads (layer, head): {heads}; FV added at resid layer {choice.layer} ({choice.how}); "
          f"stage items computed {result.computed()} (the rest found under {conf.store.root})")
    print(f"MLflow run: {s.run.run_id} (experiment '{conf.tracking.experiment}'); {wall_s:.0f} s")
    return summary
