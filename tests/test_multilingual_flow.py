"""The `multilingual` flow on a tiny model: what it logs, an independent overlap check, the recompute matrix, and
a run SIGKILLed in the middle of per-layer SAE training that resumes per layer and ends equal to a clean run.

One clean run (module fixture) serves every test; its store is the reference the others compare against.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from lensflow.tasks.core.config import ModelConf
from lensflow.tasks.core.metric_names import metric_key
from lensflow.tasks.core.models import load_model
from lensflow.tasks.core.stages import Item, Stage, digest
from lensflow.tasks.core.tracking import artifact_files, load_json, load_tensors, local_uri
from lensflow.tasks.multilingual.sae import SparseAutoencoder

EN = ["The cat sleeps on the warm mat.", "We walked to the market in the rain.", "Bread needs flour, water and salt.",
      "The train leaves at seven tomorrow.", "My sister plays the violin well.", "Snow covered the quiet village."]
FR = ["Le chat dort sur le tapis chaud.", "Nous sommes allés au marché sous la pluie.", "Le pain demande farine, eau et sel.",
      "Le train part à sept heures demain.", "Ma soeur joue bien du violon.", "La neige couvrait le village calme."]
LAYERS = [0, 2, 4]  # of tiny-llama's resid layers 0..4; neurons at blocks 1 and 3
BLOCKS = [0, 2]  # transcoders: the blocks numbered like a chosen resid layer
STEPS = 1500  # per SAE: about 3 s in a one-thread Ray worker, so the kill lands between layers even when busy
TRAIN_PARAGRAPHS = 2  # of the 6 per language train the SAEs; the other 4 are measured


@pytest.fixture(scope="module")
def settings(tmp_path_factory, tracking_uri):
    """(overrides for a store root, MLflow URI): the config every run in this module shares."""
    folder = tmp_path_factory.mktemp("parallel")
    files = {}
    for lang, lines in (("en", EN), ("fr", FR)):
        files[lang] = folder / f"{lang}.txt"
        files[lang].write_text("\n".join(lines) + "\n", encoding="utf-8")
    base = ["model.name=tiny-llama", f"tracking.uri={tracking_uri}", "ray.actors=1", "data.max_tokens=16",
            "store.chunk_size=4", "multilingual.languages=[en, fr]",
            f"multilingual.files={{en: {files['en']}, fr: {files['fr']}}}", "multilingual.paragraph_tokens=48",
            "multilingual.layers=[0, 2, 4]", "multilingual.sae.train_prompts=16", f"multilingual.sae.steps={STEPS}",
            f"multilingual.sae.train_paragraphs={TRAIN_PARAGRAPHS}",
            "multilingual.sae.batch_tokens=16", "multilingual.sae.k=4", "multilingual.neurons.calibration_prompts=8",
            "multilingual.transcoders.train.width=64", "multilingual.transcoders.train.k=4",
            "multilingual.transcoders.train.steps=40", "multilingual.transcoders.train.batch_tokens=32",
            "multilingual.transcoders.train.max_tokens=16"]

    def overrides(root: Path, *extra: str) -> list[str]:
        return [*base, f"store.root={root}", *extra]

    return overrides


@pytest.fixture(scope="module")
def clean(ray_session, prefect_harness, settings, tmp_path_factory):
    from lensflow.flows.multilingual import multilingual_flow

    root = tmp_path_factory.mktemp("clean")
    return root, multilingual_flow(config="conf/default.yaml", overrides=settings(root))


def _items(root: Path) -> dict[str, Path]:
    """Published stage items of the experiment, by path relative to the store root (keys do not include it)."""
    return {str(p.relative_to(root)): p for folder in ("multilingual", "dictionaries")
            for p in Path(root, folder).rglob("*.safetensors")}


def _load(root: Path, name: str) -> Item:
    """A published item by its relative path {stage name}/{key}/{item}.safetensors."""
    path = Path(name)
    return Stage(str(root), str(path.parent.parent), path.parent.name).load(path.stem)


def _children(client: MlflowClient, run) -> list:
    return client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")


def test_flow_logs_per_layer_metrics_and_matches_a_plain_forward(clean, tracking_uri):
    root, out = clean
    assert out["layers"] == LAYERS and out["paragraphs"] == len(EN) - TRAIN_PARAGRAPHS
    assert out["sae_trained"] == LAYERS and out["overlaps_measured"] == LAYERS and out["neuron_stages_computed"] == 3
    client = MlflowClient(local_uri(tracking_uri))
    run = client.get_run(out["run_id"])
    hist = {m.step: m.value for m in client.get_metric_history(run.info.run_id, metric_key("multilingual.overlap.translated.en-fr"))}
    assert sorted(hist) == LAYERS
    neuron_steps = client.get_metric_history(run.info.run_id, metric_key("multilingual.neurons.overlap.unrelated.en-fr"))
    assert sorted(m.step for m in neuron_steps) == [1, 3]
    assert _children(client, run) == []  # each layer's SAE training is logged into the flow's run
    curves = load_json(tracking_uri, run.info.run_id, "training/multilingual_sae_curves.json")
    assert sorted(int(layer) for layer in curves) == LAYERS
    assert all(len(c["loss"]) == STEPS for c in curves.values())
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/multilingual_overlap_sae.png", "plots/multilingual_overlap_neurons.png"} <= arts
    # transcoders of blocks 0 and 2 (numbered like the resid layers below the last): quality and overlaps per block
    assert sorted(out["transcoder_gap"]) == BLOCKS and sorted(out["transcoder_held"]) == BLOCKS
    for lang in ("en", "fr"):
        steps = client.get_metric_history(run.info.run_id, metric_key(f"multilingual.transcoder.fve.{lang}"))
        assert {m.step: m.value for m in steps} == pytest.approx(out["transcoder_fve_lang"][lang])
    tc_gap = client.get_metric_history(run.info.run_id, metric_key("multilingual.transcoder.overlap.gap"))
    assert {m.step: m.value for m in tc_gap} == pytest.approx(out["transcoder_gap"])
    # feature pages: the index and one page per chosen feature of every layer, at the layout graphs link to
    pages = artifact_files(tracking_uri, run.info.run_id, "features")
    assert "features/index.html" in pages and out["feature_pages"] > 0
    assert {f"features/layer_{l:02d}" for l in LAYERS} <= set(pages)
    per_layer = [artifact_files(tracking_uri, run.info.run_id, f"features/layer_{l:02d}") for l in LAYERS]
    assert sum(len(p) for p in per_layer) == out["feature_pages"]
    assert all(re.fullmatch(r"features/layer_\d\d/feature_\d{5}\.html", f) for p in per_layer for f in p)

    # the SAE logged to MLflow is the one published in the store
    child = run.data.tags["multilingual.sae.layer_02"]
    assert child == run.info.run_id  # the run that holds the SAE: the flow's own
    logged = load_tensors(tracking_uri, child, "sae/layer_02.safetensors")
    (stored,) = [n for n in _items(root) if n.startswith("multilingual/sae/") and n.endswith("/layer_02.safetensors")]
    published = _load(root, stored)
    assert logged.keys() == published.tensors.keys()
    assert all(torch.equal(logged[k], published.tensors[k]) for k in logged)
    fve = {m.step: m.value for m in client.get_metric_history(run.info.run_id, metric_key("multilingual.sae.fve"))}
    assert sorted(fve) == LAYERS and published.meta["metrics"]["fve"] == pytest.approx(fve[2])

    # independent check at resid layer 2: that SAE on a plain HF forward of each measured paragraph (no padding, no
    # store); the paragraphs it trained on are the others, as its published item records
    rows = out["train_rows"]
    trained = {lang: [p for i, p in enumerate(paras) if i in rows] for lang, paras in (("en", EN), ("fr", FR))}
    measured = {lang: [p for i, p in enumerate(paras) if i not in rows] for lang, paras in (("en", EN), ("fr", FR))}
    assert len(rows) == TRAIN_PARAGRAPHS and all(not set(trained[l]) & set(measured[l]) for l in trained)
    sae = SparseAutoencoder.from_state(logged)
    lm = load_model(ModelConf(name="tiny-llama"))
    feats, fve_by_hand, tokens = {}, {}, {}
    for lang in ("en", "fr"):
        feats[lang], states = [], []
        for text in measured[lang]:
            ids = lm.tokenizer(text, return_tensors="pt", truncation=True, max_length=48)["input_ids"]
            with torch.no_grad():
                h = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[2][0, 1:]
                feats[lang].append(set(torch.nonzero(sae.encode(h) > 0)[:, 1].tolist()))
            states.append(h)
        x = torch.cat(states).double()
        with torch.no_grad():
            x_hat = sae(x.float())[0].double()
        fve_by_hand[lang] = float(1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        tokens[lang] = sum(len(lm.tokenizer(t, truncation=True, max_length=48)["input_ids"]) - 1 for t in trained[lang])
    ref = np.mean([len(a & b) / len(a | b) for a, b in zip(feats["en"], feats["fr"])])
    assert hist[2] == pytest.approx(ref, abs=1e-6)
    for lang in ("en", "fr"):  # per-language FVE: every layer, and at layer 2 the measured paragraphs' by hand
        lang_fve = {m.step: m.value for m in client.get_metric_history(run.info.run_id, metric_key(f"multilingual.sae.fve.{lang}"))}
        assert sorted(lang_fve) == LAYERS and out["fve_lang"][lang] == pytest.approx(lang_fve)
        assert lang_fve[2] == pytest.approx(fve_by_hand[lang], abs=1e-4)
        on = published.meta["trained_on"][lang]
        assert on["texts"] == digest(trained[lang]) and on["tokens"] == tokens[lang] and on["share"] > 0


def test_rerun_computes_nothing_and_a_new_k_retrains_only_the_saes(clean, settings, tracking_uri):
    from lensflow.flows.multilingual import multilingual_flow

    root, out = clean
    before = {name: p.stat().st_mtime_ns for name, p in _items(root).items()}
    client = MlflowClient(local_uri(tracking_uri))
    again = multilingual_flow(config="conf/default.yaml", overrides=settings(root))
    assert (again["chunks_computed"], again["neuron_stages_computed"]) == (0, 0)
    assert again["sae_trained"] == [] and again["overlaps_measured"] == []
    assert _children(client, client.get_run(again["run_id"])) == []
    assert not artifact_files(tracking_uri, again["run_id"], "training")  # nothing trained: no training log
    assert again["gap"] == out["gap"] and again["neurons_gap"] == out["neurons_gap"] and again["fve"] == out["fve"]
    assert {name: p.stat().st_mtime_ns for name, p in _items(root).items()} == before

    other_k = multilingual_flow(config="conf/default.yaml", overrides=settings(root, "multilingual.sae.k=2"))
    assert (other_k["chunks_computed"], other_k["neuron_stages_computed"]) == (0, 0)  # stores and neurons found
    assert other_k["sae_trained"] == LAYERS and other_k["overlaps_measured"] == LAYERS
    assert other_k["neurons_gap"] == out["neurons_gap"]
    assert all(l0 <= 2 for l0 in other_k["l0"].values()) and other_k["l0"] != out["l0"]
    new = set(_items(root)) - set(before)
    assert len(new) == 3 * len(LAYERS)  # per layer: the SAE, its overlaps, its feature pages
    assert all(n.startswith(("multilingual/sae/", "multilingual/overlap/", "multilingual/pages/")) for n in new)


def _published_saes(root: Path) -> set[str]:
    return {n for n in _items(root) if n.startswith("multilingual/sae/")}


def test_killed_run_resumes_per_layer_and_equals_a_clean_run(clean, settings, tmp_path):
    """A real `lensflow run multilingual`, SIGKILLed (whole process group) once some SAEs are published."""
    from prefect.settings import PREFECT_API_URL

    clean_root, _ = clean
    root = tmp_path / "store"
    cmd = [sys.executable, "-m", "lensflow.flows.cli", "run", "multilingual"]
    for o in settings(root):
        cmd += ["--set", o]
    # the harness's Prefect server: the subprocess then skips starting a server of its own
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_API_URL": PREFECT_API_URL.value()}
    log = tmp_path / "killed.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not _published_saes(root):
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before any SAE was published: {log.read_text()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    settled, last = 0, None  # a Ray worker may still publish the layer it held: wait until nothing changes
    while settled < 3:
        now = _published_saes(root)
        settled, last = (settled + 1, now) if now == last else (0, now)
        time.sleep(1.0)
    finished = {n: (root / n).stat().st_mtime_ns for n in last}
    assert 1 <= len(finished) < len(LAYERS), finished

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout[[m.start() for m in re.finditer(r"^\{$", r.stdout, re.M)][-1]:])
    done_layers = sorted(int(Path(n).stem.removeprefix("layer_")) for n in finished)
    assert summary["sae_trained"] == [l for l in LAYERS if l not in done_layers]
    assert (summary["chunks_computed"], summary["neuron_stages_computed"]) == (0, 0)
    for n, t in finished.items():
        assert (root / n).stat().st_mtime_ns == t, f"finished SAE {n} was rewritten"

    resumed, reference = _items(root), _items(clean_root)
    # thresholds, 2 sets, then per layer the SAE, its overlaps and its feature pages, per block the transcoder overlaps
    # and per block the transcoder (the core's dictionaries stage)
    assert len(resumed) == 3 + 3 * len(LAYERS) + 2 * len(BLOCKS) and set(resumed) <= set(reference)
    for name in resumed:
        got, want = _load(root, name), _load(clean_root, name)
        assert got.tensors.keys() == want.tensors.keys(), name
        assert all(torch.equal(got.tensors[k], want.tensors[k]) for k in got.tensors), name
        got.meta.pop("run_id", None), want.meta.pop("run_id", None)
        assert json.dumps(got.meta, sort_keys=True) == json.dumps(want.meta, sort_keys=True), name


def test_saes_round_trip_through_the_saelens_layout(clean, settings, tmp_path):
    """Each layer's SAE is exported as a SAELens folder equal to its stage item, and a run importing those folders
    (`multilingual.sae.pretrained`) trains nothing and measures the same overlaps and FVE as the clean run."""
    from lensflow.flows.multilingual import multilingual_flow
    from lensflow.tasks.core.dictionaries.saelens import import_sae
    from lensflow.tasks.multilingual.sae import SparseAutoencoder

    root, out = clean
    stored = [n for n in _items(root) if n.startswith("multilingual/sae/") and n.endswith("/layer_02.safetensors")]
    stored = min(stored, key=lambda n: (root / n).stat().st_mtime_ns)  # the clean run's (a later test adds k=2)
    sae_dir = Path(root, "saelens", "multilingual", "sae", Path(stored).parent.name)
    assert sorted(p.name for p in sae_dir.iterdir()) == [f"layer_{l:02d}" for l in LAYERS]
    mine = SparseAutoencoder.from_state(_load(root, stored).tensors)
    theirs = import_sae(sae_dir / "layer_02")
    x = torch.randn(64, mine.W_dec.shape[1]) * 3
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), mine.encode(x), atol=1e-4, rtol=1e-4)

    again = multilingual_flow(config="conf/default.yaml",
                              overrides=settings(tmp_path / "store2", f"multilingual.sae.pretrained={sae_dir}"))
    assert again["layers"] == LAYERS
    for l in LAYERS:
        assert again["gap"][l] == pytest.approx(out["gap"][l], abs=1e-6)
        assert again["fve"][l] == pytest.approx(out["fve"][l], abs=1e-4)
