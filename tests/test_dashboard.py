"""Issues #10 and #24: what a lensflow run looks like on an MLflow dashboard: metrics in sections, each experiment's
first section its headline per-layer curves only (about a dozen charts at most), single values as a table and in the
description, per-layer training inside the flow's run, figures as image charts, the addresses of the Model training
view, the experiment's description as a landing page. Checked on what MLflow stored, against numbers computed here;
tests/e2e/ checks the rendered UI in a browser."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from lensflow.tasks.core import tracking  # noqa: E402
from lensflow.tasks.core.metric_names import SCHEMA, SCHEMA_TAG, is_headline, metric_key, section  # noqa: E402
from lensflow.tasks.registry import EXPERIMENTS, load_config  # noqa: E402

LANGS = ["en", "fr", "es", "de"]  # the default languages: 6 pairs
PAIRS = [f"{a}-{b}" for i, a in enumerate(LANGS) for b in LANGS[i + 1:]]
# what each flow logs with its default config (the names its report writes), per layer unless a scalar
LOGGED = {
    "future-lens": [f"future_lens.{m}.{k}.n{n}" for m in ("ngram", "linear_vocab", "linear_hidden", "fixed_prompt",
                                                         "soft_prompt") for k in ("p_at_1", "p_at_5", "surprisal")
                    for n in range(4)]
    + ["future_lens.training.soft_prompt.loss.final", "future_lens.time.total_s", "future_lens.computed.targets",
       "future_lens.n_train", "future_lens.soft_prompt.samples_per_s"],
    "logit-lens": [f"{lens}.{k}" for lens in ("logit_lens", "tuned_lens") for k in ("kl_to_final", "top1_agree")]
    + ["tuned_lens.kl_to_final_mean", "logit_lens.top1_agree_mean", "tuned_lens.better_layers",
       "tuned_lens.training.kl.final", "lenses.layer_wall_s", "lenses.time.total_s"],
    "function-vectors": ["fv.layer_scan.zero_shot_fv.acc", "fv.layer_valid.zero_shot_fv.acc", "fv.aie.max_head",
                         "fv.heads.chosen", "fv.mean.zero_shot.acc", "fv.layer", "fv.top_k", "fv.tasks", "fv.wall_s",
                         "fv.patchings_computed"]
    + [f"fv.{t}.{k}.acc" for t in ("antonym", "country_capital") for k in ("icl", "zero_shot", "zero_shot_fv")]
    + ["fv.transfer.antonym__to__antonym_french.zero_shot_fv.acc"],
    "multilingual": ["multilingual.overlap.gap", "multilingual.neurons.overlap.gap", "multilingual.sae.fve",
                     "multilingual.sae.l0", "multilingual.sae.dead", "multilingual.peak_layer",
                     "multilingual.neurons.peak_block", "multilingual.wall_s", "multilingual.training.sae.loss.final"]
    + [f"multilingual.{p}overlap.{k}.{pair}" for p in ("", "neurons.") for k in ("translated", "unrelated", "gap_se")
       for pair in PAIRS]
    + [f"multilingual.sae.fve.{lang}" for lang in LANGS] + [f"multilingual.overlap.size.{lang}" for lang in LANGS],
    "causal-trace": [f"causal_trace.{s}.aie.{g}" for s in ("resid", "mlp", "attn")
                     for g in ("first_subject_token", "middle_subject_tokens", "last_subject_token",
                               "first_subsequent_token", "further_tokens", "last_token")]
    + ["causal_trace.n_facts", "causal_trace.clean_prob", "causal_trace.n_traced"],
}
HEADLINE = {"future-lens": "future_lens", "logit-lens": "lenses", "function-vectors": "fv",
            "multilingual": "multilingual", "causal-trace": "causal_trace"}


@pytest.mark.parametrize("flow", list(LOGGED))
def test_each_experiment_opens_on_a_dozen_headline_curves(flow):
    names = LOGGED[flow]
    headline = [n for n in names if is_headline(metric_key(n))]
    keys = [metric_key(n) for n in headline]
    assert {k.split("/")[0] for k in keys} == {HEADLINE[flow]}  # one headline section, named after the experiment
    assert 4 <= len(headline) <= 12, headline
    assert EXPERIMENTS[flow].headline.metric in headline  # what sweeps rank by is on the headline
    assert max(len(k.split("/")[1]) for k in keys) <= 28, keys  # a chart's title: the part after the '/'
    # single values never make a headline chart: means, peaks, counts, bookkeeping
    for scalar in ("_mean", "better_layers", "peak_layer", ".n_facts", "wall_s", "total_s", "fv.layer", "fv.mean."):
        assert not any(n.endswith(scalar) or n.startswith(scalar + ".") for n in headline), (scalar, headline)
    # every other metric sorts after the headline section: MLflow draws sections in name order
    assert all(metric_key(n).split("/")[0] > HEADLINE[flow] for n in names if n not in headline)


def test_sections_keep_headlines_apart_from_details_and_bookkeeping():
    assert section("future_lens.soft_prompt.p_at_1.n1") == "future_lens"
    assert section("future_lens.soft_prompt.p_at_5.n1") == "future_lens.details"
    assert section("tuned_lens.kl_to_final") == section("logit_lens.top1_agree") == "lenses"
    assert section("tuned_lens.kl_to_final_mean") == "lenses.details"
    assert section("fv.layer_scan.zero_shot_fv.acc") == "fv" and section("fv.mean.zero_shot_fv.acc") == "fv.details"
    assert section("fv.antonym.zero_shot_fv.acc") == "fv.per_task"
    assert section("fv.transfer.a__to__b.zero_shot_fv.acc") == "fv.transfer"
    assert section("tuned_lens.training.kl.final") == "lenses.training"
    for counter in ("extract.prompts.tokens_per_s", "future_lens.time.total_s", "fv.patchings_computed",
                    "lenses.layer_wall_s", "multilingual.wall_s"):
        assert section(counter) == "run", counter
    # the section is not repeated in the name (a chart's title)
    assert metric_key("causal_trace.mlp.aie.last_token") == "causal_trace/mlp.aie.last_token"
    assert metric_key("fv.antonym.zero_shot.acc") == "fv.per_task/antonym.zero_shot.acc"
    assert metric_key("tuned_lens.kl_to_final") == "lenses/tuned_lens.kl_to_final"
    assert metric_key("extract.prompts.tokens_per_s") == "run/extract.prompts.tokens_per_s"
    assert metric_key(metric_key("x.y")) == "x/y"  # idempotent
    assert max(["run", "fv", "fv.per_task", "lenses", "future_lens", "multilingual", "causal_trace"]) == "run"


def test_flow_run_logs_a_summary_table_description_landing_and_training(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    conf = load_config(None, [f"tracking.uri={uri}", "tracking.experiment=dash"])
    kl = {0: 3.0, 1: 1.5, 2: 0.25, 3: 0.5}
    acc = [0.1, 0.7, 0.4]
    losses = {0: [2.0, 1.0, 0.5], 1: [3.0, 2.5], 2: [1.0, 0.75, 0.5, 0.25]}
    with tracking.flow_run(conf, "logit-lens") as run:
        tracking.measures(run, "how close each layer is to the output")
        for layer, v in kl.items():
            tracking.log_metrics(run, {"tuned_lens.kl_to_final": v}, step=layer)
        tracking.log_series(run, "fv.layer_scan.zero_shot_fv.acc", acc)
        tracking.log_metrics(run, {"fv.wall_s": 12.0, "tuned_lens.kl_to_final_mean": float(np.mean(list(kl.values())))})
        tracking.log_layer_training(run, "tuned_lens", "tuned_lens.training", [
            tracking.LayerTraining(layer, {"lr": 0.01, "stage": f"/s/layer_{layer:02d}"}, {"kl": c})
            for layer, c in losses.items()])
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot([0, 1], [0, 1])
        tracking.log_figure(run, fig, "plots/kl_to_final.png")
        tracking.log_text(run, "| layer | KL |\n|---|---|\n| 0 | 3.0 |\n", "lenses_summary.md")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("dash")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    printed = capsys.readouterr().out
    assert f"#/experiments/{exp.experiment_id}/runs/{run.run_id}?workflowType=machine_learning" in printed
    assert tracking.ui_address("http://u:secret@host:5000/", "7") == (
        "http://u:***@host:5000/#/experiments/7/runs?workflowType=machine_learning")
    r = client.get_run(run.run_id)
    m = r.data.metrics
    assert r.data.tags[SCHEMA_TAG] == SCHEMA
    history = client.get_metric_history(run.run_id, metric_key("tuned_lens.kl_to_final"))
    assert [x.value for x in history] == list(kl.values())
    assert m["run/fv.wall_s"] == 12.0 and "fv.wall_s" not in m
    assert "lenses.details/tuned_lens.kl_to_final_mean" in m
    assert not any(".summary/" in k for k in m)  # best / best layer / mean are a table, not one-point charts
    # the summary table: KL lower is better, accuracy higher is better; headline rows first
    table = tracking.table_rows(uri, run.run_id, "summary.json")
    rows = {row["key"]: row for row in table}
    kl_key, acc_key, train_key = (metric_key(n) for n in ("tuned_lens.kl_to_final", "fv.layer_scan.zero_shot_fv.acc",
                                                         "tuned_lens.training.kl.final"))
    assert rows[kl_key]["best"] == min(kl.values()) and rows[kl_key]["best_layer"] == 2
    assert rows[kl_key]["mean"] == pytest.approx(np.mean(list(kl.values())))
    assert rows[acc_key]["best"] == pytest.approx(0.7) and rows[acc_key]["best_layer"] == 1
    assert rows[train_key]["best_layer"] == 2 and rows[train_key]["best"] == 0.25
    assert {r["key"] for r in table[:2]} == {kl_key, acc_key}  # headline sections first
    assert metric_key("fv.wall_s") not in rows and len(table) == 3  # scalars get no summary
    # per-layer training in the flow's run, no run per layer: final value per layer (step = layer), table, curves
    assert not client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{run.run_id}'")
    final = {x.step: x.value for x in client.get_metric_history(run.run_id, metric_key("tuned_lens.training.kl.final"))}
    assert final == {layer: c[-1] for layer, c in losses.items()}
    table = tracking.table_rows(uri, run.run_id, "training/tuned_lens.json")
    assert [(t["layer"], t["stage"], t["kl.final"], t["kl.steps"]) for t in table] == [
        (layer, f"/s/layer_{layer:02d}", c[-1], len(c)) for layer, c in losses.items()]
    curves = tracking.load_json(uri, run.run_id, "training/tuned_lens_curves.json")
    assert curves == {str(layer): {"kl": c} for layer, c in losses.items()}
    # the figures as artifacts, and as image charts keyed by their names
    paths = {a.path for a in client.list_artifacts(run.run_id, "plots")}
    assert {"plots/kl_to_final.png", "plots/tuned_lens_training.png"} <= paths
    images = {a.path for a in client.list_artifacts(run.run_id, "images")}
    assert any("kl_to_final" in p for p in images), images
    # the run's description: what ran, the headline curves' summary, its tables
    note = r.data.tags["mlflow.note.content"]
    assert note.startswith("**lensflow logit-lens**") and "| 0 | 3.0 |" in note
    assert "| `tuned_lens.kl_to_final` | 0.25 | 2 |" in note and "tuned_lens.training" not in note  # headline rows
    # the experiment's description: the Model training address, each flow's latest finished run and its figure
    landing = client.get_experiment(exp.experiment_id).tags["mlflow.note.content"]
    assert f"(#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning)" in landing
    assert f"(#/experiments/{exp.experiment_id}/runs/{run.run_id}?workflowType=machine_learning)" in landing
    assert "| `logit-lens` | how close each layer is to the output |" in landing
    # the flow's saved view (the runs page's "Views" menu), kept by MLflow as an experiment tag
    view = json.loads(client.get_experiment(exp.experiment_id).tags["mlflow.sharedViewState.lensflow-logit-lens"])
    state = json.loads(view["state"])
    assert view["name"] == "logit-lens: headline curves" and state["searchFilter"] == "tags.flow = 'logit-lens'"
    assert state["chartsSearchFilter"] == "fv/"  # the first headline section of this run (fv sorts before lenses)
    assert "viewStateShareKey=lensflow-logit-lens)" in landing
    assert f"get-artifact?path=plots/kl_to_final.png&run_uuid={run.run_id}" in landing
