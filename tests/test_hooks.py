"""The activation mechanism against plain transformers forward passes and hand-written torch hooks."""

from __future__ import annotations

import pytest
import torch

from lensflow.tasks.core.hooks import Edit, Read, trace
from tests.conftest import FAMILIES

TEXTS = ["The cat sat on the mat", "Hi", "A longer prompt with several words in it"]


@pytest.mark.parametrize("family", FAMILIES)
def test_resid_matches_hidden_states(tiny_lms, family):
    lm = tiny_lms[family]
    enc = lm.encode(TEXTS)
    ref = lm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True).hidden_states
    with trace(lm, reads=[Read("resid", l) for l in range(lm.n_layers + 1)]) as t:
        out = t.forward(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], until=lm.n_layers)
        after_stop = True  # the stop ends the pass, never the rest of the block
    assert out is None and after_stop  # cut before the final norm
    for l in range(lm.n_layers):
        torch.testing.assert_close(t["resid", l], ref[l], atol=1e-5, rtol=0)
    # HF's last hidden state is after the final norm; the store keeps the pre-norm stream
    torch.testing.assert_close(lm.final_norm(t["resid", lm.n_layers]), ref[-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_head_read_and_replace_match_manual_hooks(tiny_lms, family):
    lm = tiny_lms[family]
    enc = lm.encode(TEXTS[:2])
    layer, head, d = 1, 2, lm.head_dim
    captured = {}
    h = lm.attn_out(layer).register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].detach().clone()))
    base_logits = lm.model(**{k: enc[k] for k in ("input_ids", "attention_mask")}).logits
    h.remove()
    with trace(lm, reads=[Read("attn_head", layer, position=enc["last"])]) as t:
        lm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    rows = torch.arange(2)
    expect = captured["x"][rows, enc["last"]].view(2, lm.n_heads, d)
    torch.testing.assert_close(t["attn_head", layer], expect)

    value = torch.randn(d)

    def manual(m, a):
        x = a[0].clone()
        x[rows, -1, head * d:(head + 1) * d] = value
        return (x,)

    h = lm.attn_out(layer).register_forward_pre_hook(manual)
    want = lm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    h.remove()
    with trace(lm, edits=[Edit("attn_head", layer, value, position=-1, head=head)]):
        got = lm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - base_logits).abs().max() > 1e-4  # the edit did something


def test_per_row_edits_and_add_mode(tiny_lms):
    lm = tiny_lms["llama"]
    enc = lm.encode(["abc def", "abc def"])
    vec = torch.randn(lm.d_model)
    with trace(lm, edits=[Edit("resid", 2, vec, position=1, rows=torch.tensor([1]), mode="add")],
               reads=[Read("resid", 2), Read("resid", 3)]) as t:
        lm.base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    r2 = t["resid", 2]
    torch.testing.assert_close(r2[1, 1] - r2[0, 1], vec, atol=1e-5, rtol=0)
    torch.testing.assert_close(r2[1, 0], r2[0, 0])  # earlier position untouched
    torch.testing.assert_close(t["resid", 3][:, 0][0], t["resid", 3][:, 0][1])  # causal: position 0 unaffected
    assert (t["resid", 3][1, 1] - t["resid", 3][0, 1]).abs().max() > 1e-4


def test_gradients_flow_through_edits(tiny_lms):
    lm = tiny_lms["gpt2"]
    enc = lm.encode(["hello there"])
    v = torch.zeros(lm.d_model, requires_grad=True)
    with trace(lm, edits=[Edit("resid", 1, v, position=-1, mode="add")]):
        logits = lm.model(input_ids=enc["input_ids"]).logits
    logits[0, -1, 5].backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_an_early_stop_computes_nothing_deeper_and_keeps_its_edits(tiny_lms):
    """until=2: the edit and read at resid 2 apply, no deeper block runs (its read stays empty), and a full pass
    after it in the same block runs normally."""
    lm = tiny_lms["llama"]
    enc = lm.encode(TEXTS[:2])
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    bump = torch.ones(lm.d_model)
    reads = [Read("resid", 2), Read("resid", 3)]
    with trace(lm, reads=reads, edits=[Edit("resid", 2, bump, position=0, mode="add")]) as t:
        assert t.forward(**inputs, until=2) is None
        assert ("resid", 3) not in t.values
        stopped = t["resid", 2].clone()
        full = t.forward(**inputs)
    assert full is not None and ("resid", 3) in t.values
    ref = lm.model(**inputs, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(stopped[:, 1:], ref[:, 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(stopped[:, 0], ref[:, 0] + bump, atol=1e-5, rtol=0)


# Each family's modules, named here rather than taken from the ArchSpec: (what feeds the attention output
# projection, what the attention block adds to the residual stream, what feeds the MLP's down projection, what
# the MLP block adds to the residual stream). Gemma 3 normalises both block outputs before the residual add.
SITE_MODULES = {
    "llama": ("self_attn.o_proj", "self_attn.o_proj", "mlp.down_proj", "mlp"),
    "qwen2": ("self_attn.o_proj", "self_attn.o_proj", "mlp.down_proj", "mlp"),
    "gpt2": ("attn.c_proj", "attn.c_proj", "mlp.c_proj", "mlp"),
    "gptj": ("attn.out_proj", "attn.out_proj", "mlp.fc_out", "mlp"),
    "gpt_neox": ("attention.dense", "attention.dense", "mlp.dense_4h_to_h", "mlp"),
    "gemma3": ("self_attn.o_proj", "post_attention_layernorm", "mlp.down_proj", "post_feedforward_layernorm"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_site_matches_manual_hooks_and_sums_to_the_residual_stream(tiny_lms, family):
    """Every block site against plain torch hooks on the family's own modules, and attn_out + mlp_out against the
    residual stream's per-block increments in HF's hidden states (what a block adds, whatever its norms)."""
    lm = tiny_lms[family]
    enc = lm.encode(TEXTS)
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    head_in, attn_mod, neuron_in, mlp_mod = SITE_MODULES[family]
    seen, handles = {}, []
    for i, block in enumerate(lm.model.get_submodule(lm.spec.blocks)):
        for name, path, pre in (("attn_head", head_in, True), ("attn_out", attn_mod, False),
                                ("mlp_neurons", neuron_in, True), ("mlp_out", mlp_mod, False)):
            def hook(m, a, o=None, key=(name, i), pre=pre):
                seen[key] = (a[0] if pre else o[0] if isinstance(o, tuple) else o).detach().clone()
            mod = block.get_submodule(path)
            handles.append(mod.register_forward_pre_hook(hook) if pre else mod.register_forward_hook(hook))
    try:
        hs = lm.model(**inputs, output_hidden_states=True).hidden_states
    finally:
        for h in handles:
            h.remove()
    sites = ("attn_head", "attn_out", "mlp_neurons", "mlp_out")
    with trace(lm, reads=[Read(s, l) for s in sites for l in range(lm.n_layers)]) as t:
        lm.base(**inputs)
    for l in range(lm.n_layers):
        torch.testing.assert_close(t["attn_head", l], seen["attn_head", l].view(*hs[0].shape[:2], lm.n_heads, -1),
                                   atol=1e-6, rtol=0)
        for s in sites[1:]:
            torch.testing.assert_close(t[s, l], seen[s, l], atol=1e-6, rtol=0)
        # resid[l] + attn_out + mlp_out = resid[l + 1]; HF's last entry is after the final norm
        after = hs[l] + t["attn_out", l] + t["mlp_out", l]
        torch.testing.assert_close(lm.final_norm(after) if l == lm.n_layers - 1 else after, hs[l + 1], atol=1e-5, rtol=0)


def test_gemma3_sites_are_what_enters_the_residual_stream(tiny_lms):
    """The post-attention / post-MLP norms change the values (so reading before them would be wrong), the embedding
    is scaled by sqrt(d_model), the unembedding is tied, and sliding-window layers only see their window."""
    lm = tiny_lms["gemma3"]
    enc = lm.encode(TEXTS[2:])
    block = lm.blocks[1]
    raw = {}
    hooks = [block.self_attn.o_proj.register_forward_hook(lambda m, a, o: raw.setdefault("attn", o.detach())),
             block.mlp.register_forward_hook(lambda m, a, o: raw.setdefault("mlp", o.detach()))]
    with trace(lm, reads=[Read("attn_out", 1), Read("mlp_out", 1), Read("resid", 0)]) as t:
        lm.base(input_ids=enc["input_ids"])
    for h in hooks:
        h.remove()
    assert (t["attn_out", 1] - raw["attn"]).abs().max() > 1e-2 and (t["mlp_out", 1] - raw["mlp"]).abs().max() > 1e-2
    emb = lm.model.get_input_embeddings().weight
    torch.testing.assert_close(t["resid", 0], emb[enc["input_ids"]] * lm.d_model ** 0.5, atol=1e-5, rtol=0)
    assert lm.unembed.weight.data_ptr() == emb.data_ptr()

    types = lm.model.config.layer_types
    assert types[0] == "sliding_attention" and types[1] == "full_attention" and lm.model.config.sliding_window == 4
    ids = enc["input_ids"]
    other = ids.clone()
    other[0, 0] = (other[0, 0] + 1) % lm.vocab_size
    reads = [Read("resid", 1), Read("resid", 2)]
    with trace(lm, reads=reads) as a:
        lm.base(input_ids=ids)
    with trace(lm, reads=reads) as b:
        lm.base(input_ids=other)
    p = 8  # beyond the local window of the first token
    torch.testing.assert_close(a["resid", 1][0, p], b["resid", 1][0, p], atol=1e-6, rtol=0)  # local layer 0
    assert (a["resid", 2][0, p] - b["resid", 2][0, p]).abs().max() > 1e-4  # global layer 1 sees token 0


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_in_is_what_the_mlp_reads_and_an_edit_there_feeds_it(tiny_lms, family):
    """mlp_in against a hand-written pre-hook on the family's MLP module (after its pre-MLP norm), the MLP applied
    to that read gives the module's own output, and replacing mlp_in changes what the MLP computes from."""
    lm = tiny_lms[family]
    enc = lm.encode(TEXTS)
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    seen, handles = {}, []
    for i, block in enumerate(lm.model.get_submodule(lm.spec.blocks)):
        mlp = block.get_submodule("mlp")  # every family's MLP module (SITE_MODULES: what lies around it)
        handles.append(mlp.register_forward_hook(
            lambda m, a, o, i=i: seen.__setitem__(i, (a[0].detach().clone(), o.detach().clone()))))
    try:
        lm.model(**inputs)
    finally:
        for h in handles:
            h.remove()
    with trace(lm, reads=[Read("mlp_in", l) for l in range(lm.n_layers)]) as t:
        lm.base(**inputs)
    for l in range(lm.n_layers):
        torch.testing.assert_close(t["mlp_in", l], seen[l][0], atol=1e-6, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(lm.mlp(l)(t["mlp_in", l]), seen[l][1], atol=1e-5, rtol=0)
    zero = torch.zeros(lm.d_model)
    got = {}
    h = lm.mlp(0).register_forward_hook(lambda m, a, o: got.setdefault("in", a[0].detach()))
    try:
        with trace(lm, edits=[Edit("mlp_in", 0, zero, position=1)]):
            lm.base(**inputs)
    finally:
        h.remove()
    assert got["in"][:, 1].abs().max() == 0 and torch.equal(got["in"][:, 0], seen[0][0][:, 0])
