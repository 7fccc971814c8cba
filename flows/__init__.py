"""Prefect flows, one module per experiment. Each flow is the experiment's outline: the stages it runs (typed
functions in lensflow.tasks), in which order, on which resources, and what it logs.

FLOWS maps the names users type to `module:function`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from lensflow.tasks.config import Config, ConfigError

FLOWS = {
    "causal-trace": "lensflow.flows.causal_trace:causal_trace_flow",
    "extract": "lensflow.flows.extract:extract_flow",
    "future-lens": "lensflow.flows.future_lens:future_lens_flow",
    "function-vectors": "lensflow.flows.function_vectors:function_vectors_flow",
    "logit-lens": "lensflow.flows.logit_lens:logit_lens_flow",
    "multilingual": "lensflow.flows.multilingual:multilingual_flow",
}

# What a sweep compares its points by: (metric, "max" | "min", "best" | "mean"). A per-layer metric (step = layer)
# scores its best layer, or its mean over layers where the best layer is trivial (KL to the final layer is 0 there).
HEADLINES = {
    "causal-trace": ("causal_trace.mlp.aie.last_subject_token", "max", "best"),
    "extract": ("extract.prompts.tokens_per_s", "max", "best"),
    "future-lens": ("future_lens.soft_prompt.p_at_1.n1", "max", "best"),
    "function-vectors": ("fv.layer_sweep.zero_shot_fv.acc", "max", "best"),
    "logit-lens": ("tuned_lens.kl_to_final", "min", "mean"),
    "multilingual": ("multilingual.overlap.gap", "max", "best"),
}


def resolve_flow(name: str) -> Callable[..., Any]:
    """The flow function behind a name of FLOWS, imported only when asked for (each pulls in its experiment)."""
    import importlib

    module, fn = FLOWS[name].split(":")
    return getattr(importlib.import_module(module), fn)


def check_inputs(flow: str, conf: Config) -> None:
    """Read and validate a flow's input files (the same loaders the flow uses), before Prefect or Ray start."""
    if flow == "causal-trace":
        from lensflow.tasks.causal_trace_facts import load_facts

        load_facts(conf.causal_trace.facts_file)
        return
    if flow == "function-vectors":
        from lensflow.tasks.fv_sweep import load_icl_tasks

        load_icl_tasks(conf.function_vectors)
        return
    from lensflow.tasks.data import load_prompts

    load_prompts(conf.data)


def _retryable(task_, task_run, state) -> bool:
    """A config error is deterministic: a retry would only redo the work that came before it."""
    return not isinstance(state.data, ConfigError)


def stage(fn: Callable[..., Any], retries: int = 1) -> Any:
    """A stage function of lensflow.tasks as a Prefect task. Stage outputs are found again by their fingerprint
    under store.root, so Prefect's own result cache stays off (hashing a tensor argument costs seconds), and a
    retry resumes where the failed try stopped."""
    return task(fn, name=fn.__name__.replace("_", "-"), cache_policy=NO_CACHE, retries=retries,
                retry_delay_seconds=5, retry_condition_fn=_retryable)
