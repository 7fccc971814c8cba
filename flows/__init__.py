"""Prefect flows, one module per experiment. FLOWS maps the names users type to `module:function`."""

FLOWS = {
    "extract": "lensflow.flows.extract:extract_flow",
    "future-lens": "lensflow.flows.future_lens:future_lens_flow",
    "function-vectors": "lensflow.flows.function_vectors:function_vectors_flow",
    "logit-lens": "lensflow.flows.logit_lens:logit_lens_flow",
    "multilingual": "lensflow.flows.multilingual:multilingual_flow",
}
