"""The `circuits` flow end to end on a tiny random Gemma 3 with real Prefect, Ray actors and MLflow: what it logs
(scores in [0, 1] and equal to the definitions recomputed here from the published graph, the graph JSON against its
documented schema with the logits' probabilities of a plain transformers forward, HTML, PNG, transcoder pages,
proposed supernodes, the interventions table with its controls), and that a rerun finds every stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

# circuits_flow is imported at collection: Prefect's console handler then holds pytest's session-long stream, not the
# capsys buffer of an earlier test (the CLI tests of test_circuits.py), closed by the time the flow logs
from lensflow.flows.circuits import circuits_flow
from lensflow.tasks.circuits.graphs import from_item
from lensflow.tasks.circuits.swaps import starts_answer
from lensflow.tasks.core.config import ModelConf
from lensflow.tasks.core.metric_names import metric_key
from lensflow.tasks.core.models import load_model
from lensflow.tasks.core.stages import Stage, digest
from lensflow.tasks.core.tracking import artifact_files, local_uri
from lensflow.tasks.data.antonym_set import load_antonyms, prompt

LANGS = ["en", "fr"]
NODE_KEYS = {"node_id", "jsNodeId", "feature", "layer", "ctx_idx", "feature_type", "activation", "influence",
             "token_prob", "is_target_logit", "clerp"}
META_KEYS = {"schema", "slug", "scan", "prompt", "prompt_tokens", "n_layers", "node_threshold", "edge_threshold",
             "replacement_score", "completeness_score", "transcoders", "n_nodes_unpruned", "n_features_unpruned",
             "feature_rows_computed"}


@pytest.fixture(scope="module")
def runs(ray_session, prefect_harness, tracking_uri, tmp_path_factory):
    """(store root, first run's result, rerun's result), the same config twice."""
    import os

    root = tmp_path_factory.mktemp("circuits")
    cwd = os.getcwd()
    os.chdir(root)  # the local graph files go under ./.lensflow/graphs
    overrides = ["model.name=tiny-gemma3", f"tracking.uri={tracking_uri}", f"store.root={root / 'store'}",
                 "ray.actors=1", "circuits.languages=[en, fr]", "circuits.texts_per_language=2",
                 "circuits.transcoder.width=48", "circuits.transcoder.k=4", "circuits.transcoder.steps=10",
                 "circuits.transcoder.batch_tokens=32", "circuits.transcoder.max_tokens=16",
                 "circuits.max_feature_rows=24", "circuits.batch_rows=32", "circuits.pairs=2",
                 "circuits.group_size=2"]
    try:
        config = str(Path(cwd, "conf/default.yaml"))
        first = circuits_flow(config=config, overrides=overrides)
        again = circuits_flow(config=config, overrides=overrides)
    finally:
        os.chdir(cwd)
    return root, first, again


class _Metrics(dict):
    """A run's metric histories [(step, value)], looked up by schema name (logged under metric_key(name))."""

    def __getitem__(self, name: str) -> list[tuple[int, float]]:
        return super().__getitem__(metric_key(name))


def _metrics(uri: str, run_id: str) -> _Metrics:
    client = MlflowClient(local_uri(uri))
    keys = client.get_run(run_id).data.metrics
    return _Metrics({k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys})


def _influence(a: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """circuit-tracer's influence written out: |A| row-normalised, p (W + W^2 + ...)."""
    w = a.abs().double()
    w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
    x, total = p @ w, torch.zeros_like(p)
    while x.any():
        total, x = total + x, x @ w
    return total, w


def test_flow_logs_scores_graphs_pages_and_interventions(runs, tracking_uri):
    root, first, _ = runs
    run_id = first["run_id"]
    m = _metrics(tracking_uri, run_id)
    prompts = [prompt(lang, load_antonyms(LANGS)[0].entries[lang].word) for lang in LANGS]
    assert [g["prompt"] for g in first["graphs"]] == prompts
    lm = load_model(ModelConf(name="tiny-gemma3"))
    (gstage,) = [p for p in (root / "store" / "circuits" / "graphs").iterdir()]
    for i, files in enumerate(first["graphs"]):
        rep, comp = files["replacement"], files["completeness"]
        assert 0 <= rep <= 1 and 0 <= comp <= 1
        assert m["circuits.graph.replacement_score"][i] == (i, pytest.approx(rep))
        assert m["circuits.graph.completeness_score"][i] == (i, pytest.approx(comp))
        # the definitions, recomputed here from the published graph as a dense matrix
        g = from_item(Stage(str(root / "store"), "circuits/graphs", gstage.name).load(
            "prompt_" + digest([files["prompt"]])[:16]))
        a = g.adjacency
        p = torch.zeros(g.size, dtype=torch.float64)
        p[g.logit_start:] = g.logit_probs.double()
        infl, w = _influence(a, p)
        tok, err = float(infl[g.token_start:g.logit_start].sum()), float(infl[g.error_start:g.token_start].sum())
        assert rep == pytest.approx(tok / (tok + err), abs=1e-9)
        weight = infl + p
        assert comp == pytest.approx(float(((1 - w[:, g.error_start:g.token_start].sum(1)) * weight).sum()
                                           / weight.sum()), abs=1e-9)
        # the graph JSON: the documented schema, links between kept nodes, the logits of a plain forward
        data = json.loads(Path(files["json"]).read_text(encoding="utf-8"))
        assert set(data["metadata"]) == META_KEYS and data["metadata"]["schema"] == "lensflow-attribution-graph/1"
        ids = {n["node_id"] for n in data["nodes"]}
        assert all(NODE_KEYS <= set(n) for n in data["nodes"])
        assert all(l["source"] in ids and l["target"] in ids and isinstance(l["weight"], float) for l in data["links"])
        with torch.no_grad():
            probs = torch.softmax(lm.model(input_ids=torch.tensor([g.tokens])).logits[0, -1].double(), -1)
        for n in (n for n in data["nodes"] if n["feature_type"] == "logit"):
            assert n["token_prob"] == pytest.approx(float(probs[n["feature"]]), abs=1e-5)
        # proposed supernodes: a YAML in the user's format, members among the graph's features, drawn on the page
        proposed = yaml.safe_load((Path(files["json"]).parent / "supernodes.proposed.yaml").read_text())
        features = {f"{l}:{f}" for l, _, f in g.features.tolist()}
        assert proposed and all(x in features for ms in proposed.values() for x in ms)
        assert m["circuits.graph.proposed_supernodes"][i] == (i, float(len(proposed)))
        html = Path(files["html"]).read_text(encoding="utf-8")
        assert all(json.dumps(name)[1:-1] in html for name in proposed)
        assert Path(files["png"]).read_bytes()[:4] == b"\x89PNG"
        logged = artifact_files(tracking_uri, run_id, "graphs/" + files["slug"])
        assert {Path(x).name for x in logged} == {"graph.json", "supernodes.proposed.yaml"}
    assert 0 <= m["circuits.replacement_score"][0][1] <= 1
    top = {Path(x).name for x in artifact_files(tracking_uri, run_id, "")}
    assert {f"attribution_{f['slug']}.html" for f in first["graphs"]} <= top and "transcoders" in top
    pages = artifact_files(tracking_uri, run_id, "transcoders")
    assert any(x.endswith("index.html") for x in pages) and any(x.endswith("pages.json") for x in pages)
    assert m["circuits.pages"][0][1] > 0 and m["circuits.pages.computed"][0][1] == 1.0

    # interventions: the table with its controls; the pairs kept are those a plain forward answers right
    table = MlflowClient(local_uri(tracking_uri)).download_artifacts(run_id, "circuits/interventions.md")
    text = Path(table).read_text(encoding="utf-8")
    assert "| experiment | prompt language | target | n | success | random features | wrong position | unedited |" in text
    pairs = load_antonyms(LANGS)[:2]
    for lang in LANGS:
        right = 0
        for pair in pairs:
            ids = lm.tokenizer(prompt(lang, pair.entries[lang].word), return_tensors="pt").input_ids
            with torch.no_grad():
                top1 = int(lm.model(input_ids=ids).logits[0, -1].argmax())
            right += starts_answer(lm.tokenizer.decode([top1]), pair.entries[lang].antonyms)
        assert m[f"circuits.kept.{lang}"][0][1] == right
    for key, values in m.items():
        if key.endswith((".success", ".random", ".wrong_position", ".unedited")):
            assert all(0 <= v <= 1 for _, v in values), key


def test_rerun_finds_every_stage(runs, tracking_uri):
    _, first, again = runs
    assert first["transcoders_computed"] > 0 and again["transcoders_computed"] == 0
    assert again["transcoders"] == first["transcoders"]
    m = _metrics(tracking_uri, again["run_id"])
    assert [v for _, v in m["circuits.graph.computed"]] == [0.0, 0.0]
    assert m["circuits.pages.computed"][0][1] == 0.0
    assert [(g["replacement"], g["completeness"]) for g in again["graphs"]] == \
        [(g["replacement"], g["completeness"]) for g in first["graphs"]]
    first_m = _metrics(tracking_uri, first["run_id"])
    assert [v for _, v in first_m["circuits.graph.computed"]] == [1.0, 1.0]


def test_lensflow_feature_opens_a_transcoder_page(runs, tracking_uri, capsys):
    """`lensflow feature LAYER:ID --flow circuits` reads the run's transcoders/ pages, not the SAE pages' features/."""
    from lensflow.flows.cli import main
    from lensflow.tasks.core.dictionaries.pages import from_dict, page_path
    from lensflow.tasks.core.tracking import load_json

    _, first, _ = runs
    layers = [from_dict(d) for d in load_json(tracking_uri, first["run_id"], "transcoders/pages.json")]
    lp = next(lp for lp in layers if lp.pages)
    page = lp.pages[0]
    args = ["--flow", "circuits", "--run-id", first["run_id"], "--set", f"tracking.uri={tracking_uri}"]
    assert main(["feature", f"{lp.layer}:{page.feature}", *args]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith(page_path(lp.layer, page.feature, "transcoders"))
    assert open(out[0]).read().startswith("<!doctype html>")
