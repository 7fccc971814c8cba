"""The `future-lens` flow end to end on a tiny model: a rerun recomputes nothing, a changed soft-prompt setting
recomputes only the soft prompts, and a run SIGKILLed during soft-prompt training resumes per layer to the
clean run's result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from lensflow.tasks.core.config import ModelConf
from lensflow.tasks.core.metric_names import metric_key
from lensflow.tasks.core.models import load_model
from lensflow.tasks.core.stages import Stage

STARTS = ["The cat", "A dog", "Hello", "Once upon", "We went", "She said", "Rain fell", "Big ships", "My hat",
          "Old roads", "Ten men", "Blue sky"]
LAYERS = 5  # tiny-llama: resid layers 0..4, all of them trained (soft prompts) so a kill lands between layers


def model_written_texts() -> list[str]:
    """Texts the tiny random model writes itself (greedy over printable ASCII, so they re-tokenize to the same
    bytes): it predicts their next tokens, so the paper's filter keeps samples (it keeps almost none of natural
    text with a random model)."""
    lm = load_model(ModelConf(name="tiny-llama", device="cpu"))
    tok = lm.tokenizer
    printable = torch.tensor([i for i in range(len(tok)) if len(c := tok.decode([i])) == 1 and c.isascii() and c.isprintable()])
    texts = []
    for start in STARTS:
        ids = tok(start)["input_ids"]
        with torch.no_grad():
            for _ in range(20):
                logits = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
                ids.append(int(printable[logits[printable].argmax()]))
        texts.append(tok.decode(ids))
    return texts


def settings(root: Path, texts_file: Path, uri: str, steps: int = 60) -> list[str]:
    return ["model.name=tiny-llama", f"store.root={root}", f"tracking.uri={uri}", "ray.actors=1",
            f"data.prompts_file={texts_file}", "data.max_tokens=16", "store.chunk_size=8",
            "future_lens.n_train=40", "future_lens.n_test=12", "future_lens.test_fraction=0.25",
            f"future_lens.causal_layers={list(range(LAYERS))}", "future_lens.linear_layers=[0, 4]",
            f"future_lens.soft_prompt_steps={steps}", "future_lens.soft_prompt_batch=4", "future_lens.vocab_steps=5",
            "future_lens.vocab_batch=8", "future_lens.vocab_rank=4", "future_lens.eval_batch=8"]


def published(root: Path, stage: str = "*") -> dict[Path, int]:
    """Published items of a Future Lens stage (any key) with their mtimes; temporary files start with a dot."""
    return {p: p.stat().st_mtime_ns for p in Path(root, "future_lens").glob(f"{stage}/*/[!.]*.safetensors")}


def contents(root: Path) -> dict[str, tuple]:
    """Every published Future Lens item: its tensors and metrics (not its wall times), by path under the root."""
    out = {}
    for p in published(root):
        item = Stage(str(root), f"future_lens/{p.parts[-3]}", p.parts[-2]).load(p.stem)
        out[str(p.relative_to(root))] = (item.tensors, item.meta.get("metrics"))
    return out


def summary(stdout: str) -> dict:
    """The JSON the CLI prints last."""
    lines = stdout.splitlines()
    return json.loads("\n".join(lines[lines.index("{"):]))


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, tracking_uri, ray_session, prefect_harness):
    """One flow run on a fresh store: (its settings, its result, its store root, the texts file)."""
    from lensflow.flows.future_lens import future_lens_flow

    tmp = tmp_path_factory.mktemp("fl_flow")
    texts_file = tmp / "texts.txt"
    texts_file.write_text("\n".join(model_written_texts()) + "\n")
    overrides = settings(tmp / "clean", texts_file, tracking_uri)
    return overrides, future_lens_flow(config="conf/default.yaml", overrides=overrides), tmp / "clean", texts_file


def test_rerun_recomputes_nothing_and_soft_prompt_steps_only_the_soft_prompts(clean_run, tracking_uri):
    from lensflow.flows.future_lens import future_lens_flow

    overrides, first, root, _ = clean_run
    assert first["computed"] == {"targets": 1, "extract_chunks": 7, "ngram": 1, **{
        f"{m}.{what}": n for m, n in (("soft_prompt", LAYERS), ("linear_hidden", 2), ("linear_vocab", 2))
        for what in ("trained", "evaluated")}, "fixed_prompt.evaluated": 2 * LAYERS}
    assert first["n_train"] == 40 and first["n_test"] == 12
    items = published(root)
    targets_written = [p.stat().st_mtime_ns for p in Path(root, "future_lens", "targets").glob("*/zarr.json")]
    again = future_lens_flow(config="conf/default.yaml", overrides=overrides)
    assert set(again["computed"].values()) == {0}
    assert again["best"] == first["best"] and published(root) == items
    client = MlflowClient(tracking_uri)
    m1, m2 = client.get_run(first["run_id"]).data.metrics, client.get_run(again["run_id"]).data.metrics
    scores = {k for k in m1 if k.startswith("future_lens/")}  # the section of scores (timings are in `run`)
    assert {metric_key(f"future_lens.{m}.p_at_1.n3") for m in ("ngram", "linear_vocab", "linear_hidden", "fixed_prompt",
                                                               "soft_prompt", "fixed_prompt_p1")} <= set(m1)
    assert {k: m2[k] for k in scores} == {k: m1[k] for k in scores}
    # the rerun logs what it found, so `lensflow lens` finds the soft prompts under its run id too
    logged = {f.path for f in client.list_artifacts(again["run_id"], "soft_prompts")}
    assert logged == {f"soft_prompts/layer_{l:02d}.safetensors" for l in range(LAYERS)}

    changed = future_lens_flow(config="conf/default.yaml",
                               overrides=[*overrides, "future_lens.soft_prompt_steps=3"])
    assert changed["computed"] == {**{k: 0 for k in first["computed"]}, "soft_prompt.trained": LAYERS,
                                   "soft_prompt.evaluated": LAYERS}
    now = published(root)
    new = {p.parts[-3] for p in now.keys() - items.keys()}
    assert new == {"soft_prompt", "soft_prompt_eval"} and len(now) == len(items) + 2 * LAYERS
    assert {p: now[p] for p in items} == items  # nothing published before was rewritten
    assert [p.stat().st_mtime_ns for p in Path(root, "future_lens", "targets").glob("*/zarr.json")] == targets_written


def test_killed_run_resumes_only_unfinished_layers(clean_run, tmp_path, tracking_uri, prefect_harness):
    """SIGKILL the `lensflow run future-lens` process group once some soft-prompt layers are published, rerun the
    same command: only the unfinished layers train, the finished ones are untouched, and every published item
    equals the clean run's."""
    import prefect.settings

    _, clean, clean_root, texts_file = clean_run
    root = tmp_path / "store"
    cmd = [sys.executable, "-m", "lensflow.flows.cli", "run", "future-lens"]
    for o in settings(root, texts_file, tracking_uri):
        cmd += ["--set", o]
    # the session's Prefect test server: no ephemeral server start-up in the subprocess
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value()}
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not published(root, "soft_prompt"):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    settled, last = 0, None  # an orphaned actor may publish the layer it holds before it dies: wait for quiet
    while settled < 3:
        now = (published(root, "soft_prompt"), published(root, "soft_prompt_eval"))
        settled, last = (settled + 1, now) if now == last else (0, now)
        time.sleep(1.0)
    trained, evaluated = last
    assert 1 <= len(trained) < LAYERS, f"kill landed outside soft-prompt training: {len(trained)} layers"

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = summary(r.stdout)
    assert out["computed"]["targets"] == 0 and out["computed"]["extract_chunks"] == 0
    assert out["computed"]["soft_prompt.trained"] == LAYERS - len(trained)
    assert out["computed"]["soft_prompt.evaluated"] == LAYERS - len(evaluated)
    assert {p: published(root, "soft_prompt")[p] for p in trained} == trained  # finished layers untouched
    assert len(published(root, "soft_prompt")) == LAYERS
    resumed = contents(root)
    reference = contents(clean_root)
    # soft prompts and their scores, 2 fixed prompts, 2 linear methods at 2 layers (trained, scored), the n-gram
    assert len(resumed) == 2 * LAYERS + 2 * LAYERS + 2 * 2 * 2 + 1 and resumed.keys() <= reference.keys()
    for path, (tensors, metrics) in resumed.items():
        ref_tensors, ref_metrics = reference[path]
        assert metrics == ref_metrics, path
        assert tensors.keys() == ref_tensors.keys() and all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors), path
    assert out["best"] == clean["best"]
