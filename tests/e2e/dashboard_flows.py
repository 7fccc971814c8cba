"""The runs `make e2e` renders: every experiment's flow once on a tiny model (each logs what its default config would,
on a smaller scale; logit-lens as the two points of a sweep), all logged to the MLflow server at argv[1]. One process,
so Prefect and Ray start once. Prints one JSON line: flow (and "sweep") -> run id."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EN = ["The cat sleeps on the warm mat.", "We walked to the market in the rain.", "Bread needs flour, water and salt.",
      "The train leaves at seven tomorrow.", "My sister plays the violin well.", "Snow covered the quiet village."]
FR = ["Le chat dort sur le tapis chaud.", "Nous sommes allés au marché sous la pluie.",
      "Le pain demande farine, eau et sel.", "Le train part à sept heures demain.", "Ma soeur joue bien du violon.",
      "La neige couvrait le village calme."]
FACTS = [{"prompt": "Ann met Bob in", "subject": "Bob", "target": " Rome", "relation": "met"},
         {"prompt": "Bob is in", "subject": "Bob", "target": " Oslo", "relation": "in"},
         {"prompt": "The cat sat on", "subject": "cat", "target": " mats", "relation": "in"}]


def main(uri: str, folder: Path) -> dict:
    from mlflow.tracking import MlflowClient

    from lensflow.flows.causal_trace import causal_trace_flow
    from lensflow.flows.function_vectors import function_vectors_flow
    from lensflow.flows.future_lens import future_lens_flow
    from lensflow.flows.multilingual import multilingual_flow
    from lensflow.flows.sweep import sweep_flow

    base = ["model.name=tiny-llama", f"store.root={folder / 'store'}", f"tracking.uri={uri}", "tracking.experiment=e2e",
            "ray.actors=1", "data.max_tokens=16", "store.chunk_size=8"]
    files = {}
    for lang, lines in (("en", EN), ("fr", FR)):
        files[lang] = folder / f"{lang}.txt"
        files[lang].write_text("\n".join(lines) + "\n", encoding="utf-8")
    facts = folder / "facts.jsonl"
    facts.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    lenses = ["data.max_prompts=12", "lenses.max_prompts=12", "lenses.epochs=1"]
    runs = {}
    runs["future-lens"] = future_lens_flow(overrides=[
        *base, "data.max_prompts=48", "future_lens.n_train=40", "future_lens.n_test=12",
        "future_lens.test_fraction=0.25",
        "future_lens.linear_layers=[0, 2, 4]", "future_lens.soft_prompt_steps=20", "future_lens.soft_prompt_batch=4",
        "future_lens.vocab_steps=5", "future_lens.vocab_batch=8", "future_lens.vocab_rank=4",
        "future_lens.eval_batch=8"])["run_id"]
    runs["function-vectors"] = function_vectors_flow(overrides=[
        *base, "function_vectors.icl_tasks=[antonym, country_capital, english_french]", "function_vectors.n_shots=3",
        "function_vectors.n_clean=3", "function_vectors.n_shuffled=2", "function_vectors.n_test=4",
        "function_vectors.n_valid=4", "function_vectors.demo_sets=2", "function_vectors.filter_correct=false",
        "function_vectors.top_k=3", "function_vectors.layer=auto", "function_vectors.layer_scan_stride=1"])["run_id"]
    runs["multilingual"] = multilingual_flow(overrides=[
        *base, "store.chunk_size=4", "multilingual.languages=[en, fr]",
        f"multilingual.files={{en: {files['en']}, fr: {files['fr']}}}", "multilingual.paragraph_tokens=48",
        "multilingual.layers=[0, 1, 2, 3, 4]", "multilingual.sae.train_prompts=16", "multilingual.sae.steps=200",
        "multilingual.sae.train_paragraphs=2", "multilingual.sae.batch_tokens=16", "multilingual.sae.k=4",
        "multilingual.neurons.calibration_prompts=8"])["run_id"]
    runs["causal-trace"] = causal_trace_flow(overrides=[
        *base, f"causal_trace.facts_file={facts}", "causal_trace.filter_correct=false", "causal_trace.samples=2",
        "causal_trace.window=2"])["run_id"]
    sweep = sweep_flow(sweep={"flow": "logit-lens", "set": [*base, *lenses], "grid": {"lenses.lr": [0.001, 0.003]}})
    runs["sweep"] = sweep["run_id"]
    # logit-lens: the sweep's newest point (a flow run like any other, nested under the sweep's run)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("e2e").experiment_id
    runs["logit-lens"] = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{sweep['run_id']}'",
                                            order_by=["attributes.start_time DESC"])[0].info.run_id
    return runs


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], Path(sys.argv[2]))))
