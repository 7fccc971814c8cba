"""Prefect flows, one module per experiment. FLOWS maps the names users type to `module:function`."""

FLOWS = {
    "extract": "flows.extract:extract_flow",
    "future-lens": "flows.future_lens:future_lens_flow",
    "function-vectors": "flows.function_vectors:function_vectors_flow",
    "logit-lens": "flows.logit_lens:logit_lens_flow",
    "multilingual": "flows.multilingual:multilingual_flow",
}
