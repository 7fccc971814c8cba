"""Function vectors: the fast head patching against a naive one-forward-per-head reference, prompts,
first-token scoring, the vector's construction, and the flow end to end (tiny random models)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lensflow.tasks.core.metric_names import metric_key
from lensflow.tasks.function_vectors.config import FunctionVectorsConf
from lensflow.tasks.function_vectors.heads import (
    function_vector,
    indirect_effects,
    last_token_logits,
    mean_head_outputs,
)
from lensflow.tasks.function_vectors.icl import (
    answer_token,
    available_icl_tasks,
    demonstrations,
    load_pairs,
    scored_prompt,
    split,
)
from lensflow.tasks.function_vectors.patching import template


@pytest.fixture(params=["llama", "gpt2", "gptj", "gpt_neox"])
def lm(request, tiny_lms):
    return tiny_lms[request.param]


def _prompt(n_shots=4, seed=0):
    rng = random.Random(seed)
    pairs = [(f"w{i}", f"v{i}") for i in range(20)]
    return template(FunctionVectorsConf()).prompt(demonstrations(pairs, n_shots, rng, shuffle_labels=True), "w3")


def naive_indirect_effects(lm, text: str, answer: int, means: torch.Tensor) -> torch.Tensor:
    """One full forward per head, patched by a plain torch pre-hook on the attention output projection."""
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    hd = lm.head_dim

    def prob(hook=None):
        handle = lm.attn_out(hook[0]).register_forward_pre_hook(hook[1]) if hook else None
        try:
            with torch.no_grad():
                return lm.model(input_ids=ids).logits[0, -1].softmax(-1)[answer].item()
        finally:
            if handle:
                handle.remove()

    base = prob()
    out = torch.zeros(lm.n_layers, lm.n_heads)
    for layer in range(lm.n_layers):
        for head in range(lm.n_heads):
            def pre(module, args, layer=layer, head=head):
                x = args[0].clone()
                x[0, -1, head * hd:(head + 1) * hd] = means[layer, head]
                return (x,)
            out[layer, head] = prob((layer, pre)) - base
    return out


def test_sweep_matches_naive_reference(lm):
    text = _prompt()
    torch.manual_seed(0)
    means = torch.randn(lm.n_layers, lm.n_heads, lm.head_dim) * 3
    answer = answer_token(lm.tokenizer, text, " v3")
    ids = lm.tokenizer(text)["input_ids"]
    fast = indirect_effects(lm, ids, answer, means, pack_tokens=1024)
    ref = naive_indirect_effects(lm, text, answer, means)
    assert ref.abs().max() > 1e-4  # the patch matters, so agreement is informative
    assert (fast - ref).abs().max().item() <= 1e-5
    # chunked packing (several passes over one cached prefix) gives the same numbers
    small = indirect_effects(lm, ids, answer, means, pack_tokens=5)
    assert (small - ref).abs().max().item() <= 1e-5


def test_packed_prompts_match_separate_forwards(lm):
    texts = [template(FunctionVectorsConf()).prompt([("ab", "cd"), ("ef", "gh")], q) for q in ("x", "yy", "zzz w")]
    got = last_token_logits(lm, [lm.tokenizer(t)["input_ids"] for t in texts], pack_tokens=1024)
    for row, text in zip(got, texts):
        ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = lm.model(input_ids=ids).logits[0, -1]
        assert (row - ref).abs().max().item() < 1e-4


def test_mean_head_outputs_match_manual_hook(lm):
    texts = ["Q: a\nA: b\n\nQ: c\nA:", "Q: dd\nA:"]
    got = mean_head_outputs(lm, texts)
    seen = []
    handle = lm.attn_out(1).register_forward_pre_hook(lambda m, a: seen.append(a[0][0, -1].clone()))
    try:
        for t in texts:
            with torch.no_grad():
                lm.model(input_ids=lm.tokenizer(t, return_tensors="pt")["input_ids"])
    finally:
        handle.remove()
    ref = torch.stack(seen).mean(0).view(lm.n_heads, lm.head_dim)
    assert torch.allclose(got[1], ref, atol=1e-5)


def test_function_vector_is_sum_through_out_projection(lm):
    torch.manual_seed(1)
    heads = [(0, 1), (2, 3), (3, 0)]
    values = torch.randn(3, lm.head_dim)
    fv = function_vector(lm, heads, values)
    # manual: place each value in its head's slice of the out-projection input, project, drop the bias
    proj = lm.attn_out(0).__class__.__name__
    ref = torch.zeros(lm.d_model)
    for (layer, head), v in zip(heads, values):
        x = torch.zeros(lm.n_heads * lm.head_dim)
        x[head * lm.head_dim:(head + 1) * lm.head_dim] = v
        mod = lm.attn_out(layer)
        with torch.no_grad():
            y = mod(x[None])[0]
            bias = getattr(mod, "bias", None)
            ref += y - (bias if bias is not None else 0)
    assert proj
    assert torch.allclose(fv, ref, atol=1e-5)


def test_prompt_format_and_split():
    tpl = template(FunctionVectorsConf())
    assert tpl.prompt([("hot", "cold"), ("big", "small")], "up") == "Q: hot\nA: cold\n\nQ: big\nA: small\n\nQ: up\nA:"
    pairs = [(str(i), str(-i)) for i in range(40)]
    s = split(pairs, seed=3)
    assert sorted(s.train + s.valid + s.test) == sorted(pairs)
    assert not set(s.test) & set(s.train) and not set(s.valid) & set(s.train) and not set(s.valid) & set(s.test)
    assert len(s.valid) == len(s.test) == 6
    assert split(pairs, seed=3) == s and split(pairs, seed=4) != s
    demos = demonstrations(s.train, 10, random.Random(0), exclude=s.train[0][0], shuffle_labels=True)
    assert len(demos) == 10 and s.train[0][0] not in [d[0] for d in demos]
    assert sorted(d[1] for d in demos) == sorted(dict(s.train)[d[0]] for d in demos)  # same labels, permuted
    assert any(d[1] != dict(s.train)[d[0]] for d in demos)


def test_answer_is_first_token_of_continuation():
    from lensflow.tasks.core.models import tiny_tokenizer

    tok = tiny_tokenizer()
    prompt = "Q: hot\nA:"
    ans = answer_token(tok, prompt, " cold")
    full = tok(prompt + " cold")["input_ids"]
    assert ans == full[len(tok(prompt)["input_ids"])]
    assert tok.decode([ans]) == " "  # byte-level: the first token is the space byte


def test_scored_prompt_skips_leading_whitespace_tokens():
    """A digit-splitting tokenizer writes " 72" as " ", "7", "2" (SmolLM2); the byte-level tiny tokenizer does the
    same to every word. The bare space is never the scored answer: it ends the prompt."""
    from lensflow.tasks.core.models import tiny_tokenizer

    tok = tiny_tokenizer()
    byte = {c: tok(c, add_special_tokens=False)["input_ids"][0] for c in "7c "}
    assert scored_prompt(tok, "Q: 3\nA:", " 72") == ("Q: 3\nA: ", byte["7"])
    assert scored_prompt(tok, "Q: hot\nA:", "  cold") == ("Q: hot\nA:  ", byte["c"])
    assert scored_prompt(tok, "Q: hot\nA:", "cold") == ("Q: hot\nA:", byte["c"])  # nothing to skip
    assert scored_prompt(tok, "Q: hot\nA:", " ") == ("Q: hot\nA:", byte[" "])  # whitespace alone stays scored


def test_builtin_and_user_icl_tasks(tmp_path):
    known = available_icl_tasks()
    assert {"antonym", "antonym_french", "antonym_spanish", "english_french"} <= set(known)
    assert load_pairs("antonym")[0] == ("hot", "cold")
    (tmp_path / "mine.json").write_text(json.dumps([{"input": str(i), "output": str(i + 1)} for i in range(8)]))
    assert load_pairs("mine", [str(tmp_path)])[2] == ("2", "3")
    from lensflow.tasks.core.config import ConfigError
    with pytest.raises(ConfigError):
        load_pairs("nope")


def test_flow_end_to_end_and_resume(ray_session, prefect_harness, tmp_path, tracking_uri):
    from mlflow.tracking import MlflowClient
    from safetensors.numpy import load_file

    from lensflow.flows.function_vectors import function_vectors_flow
    from lensflow.tasks.core.tracking import local_uri

    overrides = [
        "model.name=tiny-llama", f"tracking.uri={tracking_uri}", f"store.root={tmp_path / 'store'}", "ray.actors=1",
        "function_vectors.icl_tasks=[antonym, country_capital]", "function_vectors.n_shots=3",
        "function_vectors.n_clean=3", "function_vectors.n_shuffled=2", "function_vectors.n_test=4",
        "function_vectors.n_valid=4", "function_vectors.demo_sets=2", "function_vectors.filter_correct=false",
        "function_vectors.top_k=3", "function_vectors.layer=auto", "function_vectors.layer_scan_stride=2",
        "function_vectors.transfer=[antonym->antonym_french, antonym_french->antonym]",
    ]
    out = function_vectors_flow(config="conf/default.yaml", overrides=overrides)
    assert out["tasks"] == 2 and len(out["heads"]) == 3 and out["patchings_cached"] == 0
    assert out["computed"] == {"patchings": 3, "valid": 2, "evals": 2, "transfers": 2}  # antonym_french: transfer only
    client = MlflowClient(local_uri(tracking_uri))
    run_id = out["run_id"]
    run = client.get_run(run_id)
    metrics = run.data.metrics
    # per ICL task: one table (no chart per ICL task), read back from the run's artifact
    table = json.loads(Path(client.download_artifacts(run_id, "fv/per_task.json", str(tmp_path))).read_text())
    per_task = {row[table["columns"].index("icl_task")]: dict(zip(table["columns"], row)) for row in table["data"]}
    assert sorted(per_task) == ["antonym", "country_capital"]
    assert not [k for k in metrics if k.split("/")[-1].startswith(("antonym.", "country_capital."))]
    for icl_task in per_task:
        for kind in ("zero_shot", "zero_shot_fv", "shuffled", "shuffled_fv", "natural_text", "natural_text_fv"):
            assert 0.0 <= per_task[icl_task][f"{kind}.acc"] <= 1.0
    assert metrics[metric_key("fv.mean.zero_shot.acc")] == pytest.approx(
        (per_task["antonym"]["zero_shot.acc"] + per_task["country_capital"]["zero_shot.acc"]) / 2)
    for pair in ("antonym->antonym_french", "antonym_french->antonym"):
        for kind in ("icl", "zero_shot", "zero_shot_own_fv", "zero_shot_fv"):
            logged = metrics[metric_key(f"fv.transfer.{pair.replace('->', '__to__')}.{kind}.acc")]
            assert logged == out["transfer"][pair][f"{kind}.acc"]
    # the reverse transfer's target is an evaluated ICL task: its own-vector reference is the evaluation's number
    own = metrics[metric_key("fv.transfer.antonym_french__to__antonym.zero_shot_own_fv.acc")]
    assert own == per_task["antonym"]["zero_shot_fv.acc"]
    assert sorted(m.step for m in client.get_metric_history(run_id, metric_key("fv.layer_scan.zero_shot_fv.acc"))) == [0, 2]
    # layer=auto: the logged validation curve's best layer (the earliest of equals) is the layer used
    valid = {m.step: m.value for m in client.get_metric_history(run_id, metric_key("fv.layer_valid.zero_shot_fv.acc"))}
    assert sorted(valid) == [0, 2] and metrics[metric_key("fv.layer")] == out["layer"]
    assert out["layer"] == min(layer for layer, v in valid.items() if v == max(valid.values()))
    assert run.data.tags["fv.layer_choice"] == "auto"

    art = tmp_path / "art"
    aie = np.load(client.download_artifacts(run_id, "aie.npy", str(art)))
    per_task = np.load(client.download_artifacts(run_id, "fv/indirect_effects.npy", str(art)))
    assert aie.shape == (4, 4) and per_task.shape == (2, 4, 4)
    np.testing.assert_allclose(aie, per_task.mean(0), atol=1e-7)
    heads = json.loads(open(client.download_artifacts(run_id, "fv/heads.json", str(art))).read())["heads"]
    assert [(h["layer"], h["head"]) for h in heads] == [tuple(h) for h in out["heads"]]
    top = sorted(aie.flatten())[-3:]
    assert sorted(h["aie"] for h in heads) == pytest.approx(top)
    fvs = load_file(client.download_artifacts(run_id, "fv/function_vectors.safetensors", str(art)))
    assert set(fvs) == {"antonym", "country_capital"} and fvs["antonym"].shape == (64,)
    assert {a.path for a in client.list_artifacts(run_id, "plots")} >= {"plots/fv_aie.png", "plots/fv_layer_scan.png"}
    rows = open(client.download_artifacts(run_id, "fv/transfer.md", str(art))).read().splitlines()
    assert len(rows) == 4 and rows[2].startswith("| antonym -> antonym_french | ")

    again = function_vectors_flow(config="conf/default.yaml", overrides=overrides)  # every stage item is found
    assert again["patchings_cached"] == 3 and again["computed"] == {"patchings": 0, "valid": 0, "evals": 0, "transfers": 0}
    assert again["heads"] == out["heads"] and again["layer"] == out["layer"]
    assert again["mean"] == pytest.approx(out["mean"], nan_ok=True) and again["transfer"] == out["transfer"]
    fixed = function_vectors_flow(config="conf/default.yaml", overrides=[*overrides, "function_vectors.layer=1"])
    assert fixed["layer"] == 1 and fixed["computed"] == {"patchings": 0, "valid": 0, "evals": 2, "transfers": 2}
    assert client.get_run(fixed["run_id"]).data.tags["fv.layer_choice"] == "config"
