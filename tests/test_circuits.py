"""Circuits on tiny random models with random transcoders, every check against an independent computation: plain
transformers forwards with plain torch hooks (not tasks.core.hooks), the transcoders' own weights, finite
differences in the frozen model."""

from __future__ import annotations

import json

import pytest
import torch

from lensflow.tasks.circuits.attribution import attribute, replacement
from lensflow.tasks.circuits.interventions import Case, FeatureOp, run_cases
from lensflow.tasks.circuits.pruning import prune, scores
from lensflow.tasks.core.config import ConfigError, ModelConf
from lensflow.tasks.core.dictionaries.transcoder import Transcoder
from lensflow.tasks.core.frozen import frozen
from lensflow.tasks.core.hooks import Edit, trace
from lensflow.tasks.core.models import load_model

PROMPT = "hello there, general kenobi"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: two threads spin against each other on tiny tensors
    yield
    torch.set_num_threads(before)


def _transcoders(lm, width: int = 96, k: int = 6) -> dict[int, Transcoder]:
    out = {}
    for l in range(lm.n_layers):
        tc = Transcoder(lm.d_model, lm.d_model, width, k, seed=l)
        with torch.no_grad():
            tc.b_enc += 0.3  # random encoders on random activations: some features must be positive
            tc.scale_out.fill_(0.5)
        out[l] = tc.requires_grad_(False)
    return out


@pytest.fixture(scope="module", params=["gemma3", "llama"])
def tiny(request):
    lm = load_model(ModelConf(name=f"tiny-{request.param}"))
    return lm, _transcoders(lm)


def _plain_logits(lm, ids, mlp_out: dict[int, torch.Tensor] | None = None, add: dict | None = None) -> torch.Tensor:
    """A plain transformers forward; mlp_out: {layer: [S, d]} replaces what each MLP block adds; add: {layer:
    (position, vector)} adds to it. Plain torch hooks on the modules the architecture table names."""
    handles = []
    for l in range(lm.n_layers):
        def hook(module, args, output, l=l):
            out = mlp_out[l][None].to(output.dtype).clone() if mlp_out is not None else output.clone()
            if add and l in add:
                for p, v in add[l]:
                    out[:, p] += v.to(out.dtype)
            return out
        if mlp_out is not None or (add and l in add):
            handles.append(lm.mlp_resid(l).register_forward_hook(hook))
    try:
        with torch.no_grad():
            return lm.model(input_ids=ids, use_cache=False).logits[0].float()
    finally:
        for h in handles:
            h.remove()


def _mlp_inputs(lm, ids, add: dict | None = None) -> dict[int, torch.Tensor]:
    """Each block's MLP input [S, d] on a plain forward (optionally with additions to MLP outputs)."""
    got, handles = {}, []
    for l in range(lm.n_layers):
        handles.append(lm.mlp(l).register_forward_pre_hook(lambda m, a, l=l: got.__setitem__(l, a[0][0].float())))
    try:
        _plain_logits(lm, ids, add=add)
    finally:
        for h in handles:
            h.remove()
    return got


def test_replacement_with_errors_reproduces_the_model(tiny):
    lm, tcs = tiny
    ids = lm.tokenizer(PROMPT, return_tensors="pt").input_ids
    reference = _plain_logits(lm, ids)
    with frozen(lm) as fz:
        rep = replacement(lm, tcs, ids, fz)
        edits = [Edit("mlp_out", l, (tcs[l].decode(rep.codes[l]) + rep.errors[l])[None], position=None)
                 for l in range(lm.n_layers)]
        with torch.no_grad(), trace(lm, edits=edits):
            logits = lm.unembed(lm.base(input_ids=ids).last_hidden_state)[0].float()
    assert any(c.any() for c in rep.codes)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)


def _frozen_targets(lm, tcs, ids, mlp_out: dict[int, torch.Tensor]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """In the frozen model (replay) with every MLP output held at `mlp_out`: each block's MLP input and the last
    position's demeaned logits, through plain torch hooks."""
    got, handles = {}, []
    for l in range(lm.n_layers):
        handles.append(lm.mlp(l).register_forward_pre_hook(lambda m, a, l=l: got.__setitem__(l, a[0][0].double())))
        handles.append(lm.mlp_resid(l).register_forward_hook(lambda m, a, o, l=l: mlp_out[l][None].to(o.dtype)))
    try:
        with torch.no_grad():
            h = lm.base(input_ids=ids).last_hidden_state[0, -1]
    finally:
        for hd in handles:
            hd.remove()
    logits = lm.unembed(h).double()
    return got, logits - logits.mean()


def test_edges_equal_finite_differences_in_the_frozen_model(tiny):
    lm, tcs = tiny
    g = attribute(lm, tcs, PROMPT, logit_share=0.5, max_logits=3, batch_rows=16)
    ids = torch.tensor([g.tokens])
    L, S = g.n_layers, g.n_pos
    with frozen(lm) as fz:
        fz.record(input_ids=ids)
        clean_out = {l: _plain_mlp_out(lm, ids, l) for l in range(L)}
        base_in, base_logits = _frozen_targets(lm, tcs, ids, clean_out)

        def target_value(t: int, mlp_in, logits) -> float:
            if t >= g.logit_start:
                return float(logits[g.logit_tokens[t - g.logit_start]])
            l, p, f = g.features[t].tolist()
            tc = tcs[l]
            return float(mlp_in[l][p] @ tc.encoder_vectors()[f].double())

        gen = torch.Generator().manual_seed(0)
        checked = 0
        targets = list(range(g.logit_start, g.size)) + torch.randperm(g.n_features, generator=gen)[:6].tolist()
        for t in targets:
            row = g.adjacency[t]
            sources = row.nonzero().flatten()
            for s in sources[torch.randperm(len(sources), generator=gen)[:4]].tolist():
                perturbed = {l: v.clone() for l, v in clean_out.items()}
                if s < g.n_features:  # remove the feature: its activation times its decoder vector
                    l, p, f = g.features[s].tolist()
                    perturbed[l][p] -= g.activations[s] * tcs[l].decoder_vectors()[f]
                    in_, lo = _frozen_targets(lm, tcs, ids, perturbed)
                elif s < g.token_start:  # remove the error node
                    l, p = divmod(s - g.error_start, S)
                    tc = tcs[l]
                    z = tc.encode(_mlp_inputs(lm, ids)[l][p])
                    z[...] = z if p else 0
                    perturbed[l][p] -= clean_out[l][p] - tc.decode(z)
                    in_, lo = _frozen_targets(lm, tcs, ids, perturbed)
                else:  # remove the token's embedding (resid 0 at its position)
                    p = s - g.token_start
                    h = lm.blocks[0].register_forward_pre_hook(
                        lambda m, a, kw, p=p: ((a[0].clone().index_put_((torch.tensor([0]), torch.tensor([p])),
                                                                         torch.zeros(1, a[0].shape[-1])),) if a else a,
                                               {**kw, "hidden_states": kw["hidden_states"].clone().index_put_(
                                                   (torch.tensor([0]), torch.tensor([p])),
                                                   torch.zeros(1, kw["hidden_states"].shape[-1]))}
                                               if "hidden_states" in kw else kw), with_kwargs=True)
                    try:
                        in_, lo = _frozen_targets(lm, tcs, ids, perturbed)
                    finally:
                        h.remove()
                effect = target_value(t, base_in, base_logits) - target_value(t, in_, lo)
                assert abs(effect - float(row[s])) <= 1e-4 * max(1.0, abs(effect)), (t, s, effect, float(row[s]))
                checked += 1
    assert checked >= 20


def _plain_mlp_out(lm, ids, layer: int) -> torch.Tensor:
    got = {}
    h = lm.mlp_resid(layer).register_forward_hook(lambda m, a, o: got.__setitem__("y", o[0].float()))
    try:
        with torch.no_grad():
            lm.base(input_ids=ids)
    finally:
        h.remove()
    return got["y"]


@pytest.mark.parametrize("tiny", ["gemma3"], indirect=True)
def test_batched_attribution_equals_one_target_per_pass(tiny):
    lm, tcs = tiny
    batched = attribute(lm, tcs, "abc def", batch_rows=64)
    single = attribute(lm, tcs, "abc def", batch_rows=1)
    torch.testing.assert_close(batched.adjacency, single.adjacency, atol=1e-5, rtol=0)
    # only the most influential features' rows: those rows are the full graph's, the others are not computed
    partial = attribute(lm, tcs, "abc def", batch_rows=8, max_feature_rows=20)
    rows = partial.rows_computed
    assert int(rows[:partial.n_features].sum()) == 20 and rows[partial.logit_start:].all()
    torch.testing.assert_close(partial.adjacency[rows], batched.adjacency[rows], atol=1e-5, rtol=0)
    assert not partial.adjacency[~rows].any()


@pytest.mark.parametrize("tiny", ["gemma3"], indirect=True)
def test_pruning_and_scores_are_shares(tiny):
    lm, tcs = tiny
    g = attribute(lm, tcs, PROMPT, batch_rows=64)
    pr, s = prune(g, 0.8, 0.98), scores(g)
    assert 0 <= s.replacement <= 1 and 0 <= s.completeness <= 1
    assert pr.nodes[g.token_start:].all() and pr.nodes[:g.n_features].sum() < g.n_features
    assert not pr.edges[~pr.nodes[g.rows]].any() and not pr.edges[:, ~pr.nodes].any()


@pytest.mark.parametrize("tiny", ["gemma3"], indirect=True)
def test_zero_strength_leaves_logits_unchanged(tiny):
    lm, tcs = tiny
    ids = lm.tokenizer(PROMPT, return_tensors="pt").input_ids
    op = FeatureOp(1, 3, (0, 1, 2), "add", (5.0, -3.0, 2.0))
    logits = run_cases(lm, tcs, [Case(PROMPT, [op, FeatureOp(2, 5, (4,), "set", (0.0,))])], strength=0.0)
    torch.testing.assert_close(logits[0], _plain_logits(lm, ids)[-1], atol=1e-6, rtol=0)


def test_feature_edit_equals_the_residual_edit_by_hand(tiny):
    lm, tcs = tiny
    ids = lm.tokenizer(PROMPT, return_tensors="pt").input_ids
    z1 = tcs[1].encode(_mlp_inputs(lm, ids)[1][3])
    active = z1.nonzero().flatten().tolist()
    ops = [FeatureOp(1, 3, (active[0], 7), "set", (0.0, 1.5)), FeatureOp(2, 4, (3, 9), "scale", (2.0, 0.5)),
           FeatureOp(2, 4, (11,), "add", (2.5,))]
    strength = 0.7
    # by hand: layer 1's change from the clean codes, then layer 2's codes read on a pass carrying layer 1's edit
    w1 = z1.clone()
    w1[active[0]], w1[7] = 0.0, 1.5
    d1 = strength * (w1 - z1) @ (tcs[1].W_dec * tcs[1].scale_out)
    z2 = tcs[2].encode(_mlp_inputs(lm, ids, add={1: [(3, d1)]})[2][4])
    w2 = z2.clone()
    w2[3], w2[9] = z2[3] * 2.0, z2[9] * 0.5
    d2a = strength * (w2 - z2) @ (tcs[2].W_dec * tcs[2].scale_out)
    w3 = z2.clone()
    w3[11] = z2[11] + 2.5
    d2b = strength * (w3 - z2) @ (tcs[2].W_dec * tcs[2].scale_out)
    by_hand = _plain_logits(lm, ids, add={1: [(3, d1)], 2: [(4, d2a), (4, d2b)]})[-1]
    edited = run_cases(lm, tcs, [Case(PROMPT, ops)], strength=strength)[0]
    assert (by_hand - _plain_logits(lm, ids)[-1]).abs().max() > 1e-3  # the edit changes something
    torch.testing.assert_close(edited, by_hand, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tiny", ["gemma3"], indirect=True)
def test_graph_files_follow_the_schema(tiny, tmp_path):
    from lensflow.tasks.circuits.report import write_graph

    lm, tcs = tiny
    g = attribute(lm, tcs, PROMPT, batch_rows=64)
    feats = g.features[:2].tolist()
    files, fig = write_graph(g, lm.name, "store/dictionaries/transcoders/KEY", 0.8, 0.98,
                             {"pair": [(l, f) for l, _, f in feats]}, out_dir=tmp_path,
                             proposed={"multilingual": [tuple(feats[1][::2])]})
    assert (tmp_path / files.slug / "supernodes.proposed.yaml").read_text() == f"multilingual:\n- {feats[1][0]}:{feats[1][2]}\n"
    data = json.loads(open(files.json, encoding="utf-8").read())
    ids = {n["node_id"] for n in data["nodes"]}
    assert data["metadata"]["schema"] == "lensflow-attribution-graph/1"
    assert {n["feature_type"] for n in data["nodes"]} >= {"embedding", "logit", "mlp reconstruction error"}
    assert all(l["source"] in ids and l["target"] in ids for l in data["links"])
    f = next(n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder")
    assert f["feature_page"] == f"transcoders/layer_{int(f['layer']):02d}/feature_{f['feature']:05d}.html"
    page = open(files.html, encoding="utf-8").read()
    assert "<script src" not in page and f["node_id"] in page
    assert open(files.png, "rb").read(4) == b"\x89PNG"


def _cli(tmp_path, *args: str) -> list[str]:
    return ["attribute", *args, "--model", "tiny-gemma3", "--set", f"store.root={tmp_path / 'store'}",
            "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]


def _publish_transcoders(root, model_name: str) -> str:
    """A transcoder stage of `model_name` as the stage would publish it (random weights: only identity matters)."""
    from lensflow.tasks.core.dictionaries.config import TranscoderConf
    from lensflow.tasks.core.dictionaries.transcoder_stage import transcoder_stage
    from lensflow.tasks.core.stages import Item

    lm = load_model(ModelConf(name=model_name))
    stage = transcoder_stage(str(root), lm.id, TranscoderConf(width=32, k=4), ["x"])
    for l, tc in _transcoders(lm, width=32, k=4).items():
        stage.save(f"layer_{l:02d}", Item(tc.state(), {"model": lm.id.__dict__, "metrics": {}}))
    return stage.url


def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, monkeypatch, capsys):
    from lensflow.flows.cli import main
    from lensflow.tasks.circuits.checks import check_inputs
    from lensflow.tasks.registry import load_config

    monkeypatch.chdir(tmp_path)
    supernodes = tmp_path / "groups.yaml"
    supernodes.write_text("antonym: ['1:3', '2:5']\nlanguage: ['9:5']\n")
    other = _publish_transcoders(tmp_path / "other", "tiny-llama")
    cases = [(_cli(tmp_path, ""), "prompt ''"),
             (_cli(tmp_path, PROMPT, "--set", f"circuits.supernodes={supernodes}"), "groups.yaml: supernode 'language'"),
             (_cli(tmp_path, PROMPT, "--set", f"circuits.transcoders={other}"), "circuits.transcoders"),
             (_cli(tmp_path, PROMPT, "--set", "circuits.max_graph_mb=0.5"), "over circuits.max_graph_mb=0.5")]
    for argv, needle in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "store").exists() and not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / ".lensflow").exists()
    # the same folder is accepted for the model it was trained on
    mine = _publish_transcoders(tmp_path / "mine", "tiny-gemma3")
    conf = load_config(None, ["model.name=tiny-gemma3", f"circuits.transcoders={mine}"])
    check_inputs(conf, [PROMPT])
    with pytest.raises(ConfigError, match="circuits.transcoders"):
        check_inputs(load_config(None, ["model.name=tiny-gemma3", f"circuits.transcoders={other}"]), [PROMPT])


def test_transcoder_stage_trains_a_group_in_one_pass_and_resumes(tmp_path):
    from lensflow.tasks.core.dictionaries.config import TranscoderConf
    from lensflow.tasks.core.dictionaries.transcoder_stage import (
        TranscoderJob,
        load_transcoders,
        train_group,
        transcoder_stage,
    )

    lm = load_model(ModelConf(name="tiny-llama"))
    conf = TranscoderConf(width=32, k=4, steps=5, batch_tokens=16, max_tokens=12)
    texts = [f"text number {i} about cats and dogs" for i in range(12)]
    stage = transcoder_stage(str(tmp_path), lm.id, conf, texts)
    job = TranscoderJob(stage, lm.id, (0, 1, 2, 3), conf.model_dump(), tuple(texts))
    first = train_group(lm, job)
    assert [t.layer for t in first] == [0, 1, 2, 3] and all(t.trained for t in first)
    assert all(0 < t.metrics["l0"] <= 4 for t in first)
    again = train_group(lm, job)  # published: found, not trained
    assert not any(t.trained for t in again) and [t.metrics for t in again] == [t.metrics for t in first]
    tcs = load_transcoders(stage.url, lm.id, lm.n_layers)
    x = torch.randn(3, lm.d_model)
    torch.testing.assert_close(tcs[2](x)[0], tcs[2].decode(tcs[2].encode(x)))


def _page(layer: int, feature: int, rates: dict[str, float], top: list[str] = (), peaks: list[str] = ()):
    from lensflow.tasks.core.dictionaries.pages import Context, FeaturePage, LanguageProfile

    langs = ("en", "fr", "es", "de", "zh")
    profile = {s: LanguageProfile(100, rates.get(s, 0.0), rates.get(s, 0.0), 0.0) for s in langs}
    ctx = [Context("en", i, 1, 1.0, ["a", t, "b"], [0.0, 1.0, 0.0], 1) for i, t in enumerate(peaks)]
    # kind "dense" on purpose: the proposal must come from the profile, not from the page's index list
    return FeaturePage(layer, feature, "dense", 0.1, profile, ctx, [(t, 1.0) for t in top])


@pytest.mark.parametrize("tiny", ["gemma3"], indirect=True)
def test_proposed_supernodes_from_page_data(tiny, tmp_path):
    from lensflow.tasks.circuits.graph_json import graph_json, node_ids
    from lensflow.tasks.circuits.graph_page import graph_html
    from lensflow.tasks.circuits.proposed import graph_features, propose, to_yaml
    from lensflow.tasks.circuits.supernodes import graph_members, load_supernodes
    from lensflow.tasks.core.dictionaries.pages import LayerPages

    lm, tcs = tiny
    g = attribute(lm, tcs, PROMPT, batch_rows=64)
    keep = prune(g, 0.8, 0.98).nodes[:g.n_features]
    kept = sorted({(l, f) for (l, _, f), k in zip(g.features.tolist(), keep.tolist()) if k})
    feats = kept[:6]  # kept after pruning, so every group has nodes on the page
    assert len(feats) == 6
    rates = [{"en": .5, "fr": .1, "es": .1, "de": .1, "zh": .1},  # active everywhere: multilingual despite 5x on en
             {"en": .4, "fr": .2},  # exactly 2x: English-specific
             {"en": .3, "fr": .2},  # 1.5x: neither
             {"zh": .3},  # Chinese only
             {s: .2 for s in ("en", "fr", "es", "de", "zh")},
             {}]
    tops = [[], ["peti"], ["sm", "hotter"], [], ["\u2581chaud"], []]  # "peti": a leading piece of "petit"
    peaks = [[], [], [], [], [], ["Hot"]]
    pages = [_page(l, f, r, t, p) for (l, f), r, t, p in zip(feats, rates, tops, peaks)]
    absent = next((0, f) for f in range(96) if (0, f) not in set(graph_features(g.features)))
    pages.append(_page(*absent, {"en": .9}, ["hot"]))  # not active in this graph: in no group
    by_layer = [LayerPages(l, "transcoder", 96, 0.0, [p for p in pages if p.layer == l]) for l in range(lm.n_layers)]
    operands = {"hot": ["hot", "chaud", "caliente", "heiß", "热"], "small": ["small", "petit", "pequeño", "klein", "小"]}
    got = propose(by_layer, graph_features(g.features), operands)

    # independently: the rule written out on the hand-built rates
    want: dict[str, list] = {}
    for (l, f), r in zip(feats, rates):
        full = {s: r.get(s, 0.0) for s in ("en", "fr", "es", "de", "zh")}
        if min(full.values()) > 0:
            want.setdefault("multilingual", []).append((l, f))
            continue
        for s, v in full.items():
            if v > 0 and v >= 2 * max(x for t, x in full.items() if t != s):
                want.setdefault(f"language-specific:{s}", []).append((l, f))
    want["operand:hot"] = [feats[4], feats[5]]
    want["operand:small"] = [feats[1]]
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in want.items()}
    assert got["multilingual"] == sorted([feats[0], feats[4]]) and got["language-specific:zh"] == [feats[3]]

    # the user's YAML format, read back by the user's loader; drawn as groups on the graph page
    path = tmp_path / "proposed.yaml"
    path.write_text(to_yaml(got), encoding="utf-8")
    assert load_supernodes(path, lm.n_layers, 96) == got
    pruned = prune(g, 0.8, 0.98)
    kept_ids = [n for n, k in zip(node_ids(g), pruned.nodes.tolist()) if k]
    data = graph_json(g, pruned, scores(g), lm.name, "KEY", 0.8, 0.98, graph_members(got, kept_ids))
    assert {name for name, *_ in data["qParams"]["supernodes"]} == set(got)  # (write_graph: the schema test)
    assert "operand:hot" in graph_html(data)


@pytest.mark.parametrize("tiny", ["gemma3"], indirect=True)
def test_long_prompt_chunks_equal_one_pass_and_the_budget_refuses(tiny):
    from lensflow.tasks.circuits.attribution import BYTES_PER_CELL, max_nodes

    lm, tcs = tiny
    prompt = "abc def ghi"
    whole = attribute(lm, tcs, prompt, batch_rows=512)  # every target row in one backward pass
    S = whole.n_pos
    chunked = attribute(lm, tcs, prompt, batch_rows=512, max_batch_tokens=3 * S)  # 3 rows per pass
    torch.testing.assert_close(chunked.adjacency, whole.adjacency, atol=1e-6, rtol=0)
    assert whole.size <= max_nodes(lm.n_layers, S, 6, len(whole.logit_tokens))  # the upfront bound holds
    rows = 1 + len(whole.logit_tokens)  # one feature's row and the logits'
    need = BYTES_PER_CELL * whole.size * rows / 2**20  # MiB, counted here from the node and row counts
    assert need * 1.01 < BYTES_PER_CELL * whole.size ** 2 / 2**20  # a budget the dense graph would not fit
    held = attribute(lm, tcs, prompt, batch_rows=512, max_feature_rows=1, max_graph_mb=need * 1.01)
    assert tuple(held.weights.shape) == (rows, whole.size)
    with pytest.raises(ConfigError, match="circuits.max_graph_mb") as err:
        attribute(lm, tcs, prompt, batch_rows=512, max_feature_rows=1, max_graph_mb=need * 0.99)
    assert len(str(err.value).splitlines()) == 1 and f"{whole.size} graph nodes" in str(err.value)


@pytest.mark.parametrize("tiny", ["gemma3"], indirect=True)
def test_row_storage_prunes_and_scores_like_the_dense_graph(tiny):
    """The rows-only graph against the unchunked one (every node's row slot allocated): the same edges, the same
    pruned nodes and edges, the same scores; and against influence computed here by a dense matrix series."""
    lm, tcs = tiny
    rows = attribute(lm, tcs, PROMPT, batch_rows=16, max_feature_rows=40)
    dense = attribute(lm, tcs, PROMPT, batch_rows=16, max_feature_rows=40, dense=True)
    assert rows.weights.shape[0] == 40 + len(rows.logit_tokens) and dense.weights.shape[0] == dense.size
    torch.testing.assert_close(rows.adjacency, dense.adjacency, atol=0, rtol=0)
    pr, pd = prune(rows), prune(dense)
    assert torch.equal(pr.nodes, pd.nodes)
    r_idx, s_idx = pr.edges.nonzero(as_tuple=True)
    as_dense = torch.zeros(rows.size, rows.size, dtype=torch.bool)
    as_dense[rows.rows[r_idx], s_idx] = True
    assert torch.equal(as_dense, pd.edges) and as_dense.any()
    # float64 sums over differently shaped operands: equal to the last bits of rounding (one ulp seen), not bit-equal
    assert vars(scores(rows)) == pytest.approx(vars(scores(dense)), rel=1e-12, abs=0)
    # influence by hand: the dense normalised matrix's power series
    a = rows.adjacency.abs().double()
    w = a / a.sum(1, keepdim=True).clamp_min(1e-12)
    x, total = rows.logit_weights().double() @ w, torch.zeros(rows.size, dtype=torch.float64)
    while x.any():
        total, x = total + x, x @ w
    torch.testing.assert_close(pr.influence, total, atol=1e-12, rtol=1e-9)
