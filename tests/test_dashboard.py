"""Issue #10: what a lensflow run looks like on an MLflow dashboard: the training view, metrics in sections,
per-layer summaries, figures as image charts, a description. Checked on what MLflow stored, against numbers
computed here; tests/e2e/ checks the rendered UI in a browser."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from lensflow.tasks.core import tracking  # noqa: E402
from lensflow.tasks.core.metric_names import SCHEMA, SCHEMA_TAG, metric_key, section  # noqa: E402
from lensflow.tasks.registry import load_config  # noqa: E402


def test_sections_keep_headlines_apart_from_details_and_bookkeeping():
    assert section("future_lens.soft_prompt.p_at_1.n1") == "future_lens"
    assert section("tuned_lens.kl_to_final") == section("logit_lens.top1_agree") == "lenses"
    assert section("fv.mean.zero_shot_fv.acc") == section("fv.layer_sweep.zero_shot_fv.acc") == "fv"
    assert section("fv.antonym.zero_shot_fv.acc") == "fv.per_task"
    assert section("fv.transfer.a__to__b.zero_shot_fv.acc") == "fv.transfer"
    for counter in ("extract.prompts.tokens_per_s", "future_lens.time.total_s", "fv.sweeps_computed",
                    "lenses.layer_wall_s", "multilingual.wall_s"):
        assert section(counter) == "run", counter
    assert metric_key("causal_trace.mlp.aie.last_token") == "causal_trace/causal_trace.mlp.aie.last_token"
    assert metric_key(metric_key("x.y")) == "x/x.y"  # idempotent
    assert sorted(["run", "fv", "fv.per_task", "lenses", "future_lens", "multilingual", "causal_trace"])[-1] == "run"


def test_flow_run_logs_sections_summaries_images_and_a_description(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    conf = load_config(None, [f"tracking.uri={uri}", "tracking.experiment=dash"])
    kl = {0: 3.0, 1: 1.5, 2: 0.25, 3: 0.5}
    acc = [0.1, 0.7, 0.4]
    with tracking.flow_run(conf, "logit-lens") as run:
        for layer, v in kl.items():
            tracking.log_metrics(run, {"tuned_lens.kl_to_final": v}, step=layer)
        tracking.log_series(run, "fv.layer_sweep.zero_shot_fv.acc", acc)
        tracking.log_metrics(run, {"fv.wall_s": 12.0})
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot([0, 1], [0, 1])
        tracking.log_figure(run, fig, "plots/kl_to_final.png")
        tracking.log_text(run, "| layer | KL |\n|---|---|\n| 0 | 3.0 |\n", "lenses_summary.md")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("dash")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    r = client.get_run(run.run_id)
    m = r.data.metrics
    assert r.data.tags[SCHEMA_TAG] == SCHEMA
    assert [x.value for x in client.get_metric_history(run.run_id, "lenses/tuned_lens.kl_to_final")] == list(kl.values())
    assert m["run/fv.wall_s"] == 12.0 and "fv.wall_s" not in m
    # KL: lower is better; accuracy: higher is better
    assert m["lenses.summary/tuned_lens.kl_to_final.best"] == min(kl.values())
    assert m["lenses.summary/tuned_lens.kl_to_final.best_layer"] == 2
    assert m["lenses.summary/tuned_lens.kl_to_final.mean"] == pytest.approx(np.mean(list(kl.values())))
    assert m["fv.summary/fv.layer_sweep.zero_shot_fv.acc.best"] == pytest.approx(0.7)
    assert m["fv.summary/fv.layer_sweep.zero_shot_fv.acc.best_layer"] == 1
    assert not any(k.startswith("run.summary/") for k in m)  # scalars get no summary
    # the figure as an artifact and as an image chart keyed by its name
    paths = {a.path for a in client.list_artifacts(run.run_id, "plots")}
    assert "plots/kl_to_final.png" in paths
    images = {a.path for a in client.list_artifacts(run.run_id, "images")}
    assert any("kl_to_final" in p for p in images), images
    note = r.data.tags["mlflow.note.content"]
    assert note.startswith("**lensflow logit-lens**") and "| 0 | 3.0 |" in note
