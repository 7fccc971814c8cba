"""The one cache: fingerprints move with exactly their inputs, publishing is all-or-nothing, concurrent runs share
work, and the activation store is found again or recomputed as its inputs say."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import zarr

from lensflow.tasks.core import extraction
from lensflow.tasks.core.actors import ModelPool
from lensflow.tasks.core.config import ModelConf
from lensflow.tasks.core.models import load_model, tiny_config, tiny_tokenizer, tokenizer_hash
from lensflow.tasks.core.prompts import builtin_texts
from lensflow.tasks.core.stages import Item, ModelId, Stage, fingerprint

MODEL = ModelId("m", None, "float32", "w0", "t0")


def test_fingerprint_moves_with_each_input_and_only_with_them():
    base = fingerprint("s", MODEL, {"a": 1, "b": [1, 2]}, ["k1"])
    assert base == fingerprint("s", MODEL, {"b": [1, 2], "a": 1}, ["k1"])  # key order is not identity
    changed = [
        fingerprint("s2", MODEL, {"a": 1, "b": [1, 2]}, ["k1"]),
        fingerprint("s", replace(MODEL, weights_hash="w1"), {"a": 1, "b": [1, 2]}, ["k1"]),
        fingerprint("s", replace(MODEL, tokenizer_hash="t1"), {"a": 1, "b": [1, 2]}, ["k1"]),
        fingerprint("s", replace(MODEL, dtype="float16"), {"a": 1, "b": [1, 2]}, ["k1"]),
        fingerprint("s", MODEL, {"a": 2, "b": [1, 2]}, ["k1"]),
        fingerprint("s", MODEL, {"a": 1, "b": [1, 2]}, ["k2"]),
        fingerprint("s", MODEL, {"a": 1, "b": [1, 2]}, ["k1"], version=2),
    ]
    assert len({base, *changed}) == len(changed) + 1


def test_items_round_trip_and_half_written_items_are_not_found(tmp_path):
    st = Stage.of(str(tmp_path), "probe", MODEL, {"x": 1})
    assert st.load("layer_00") is None
    value = Item({"w": torch.arange(6.0).view(2, 3)}, {"acc": 0.25, "curve": [1.0, 0.5]})
    st.save("layer_00", value)
    got = st.load("layer_00")
    assert torch.equal(got.tensors["w"], value.tensors["w"]) and got.meta == value.meta
    # a writer killed mid-write leaves only its temporary file: the item is still absent, and is recomputed
    Path(st.url, ".layer_01.safetensors.tmpXYZ").write_bytes(b"\x00" * 10)
    calls = []
    item, computed = st.get_or_compute("layer_01", lambda: calls.append(1) or Item({}, {"acc": 1.0}))
    assert computed and calls == [1] and item.meta == {"acc": 1.0}
    item, computed = st.get_or_compute("layer_01", lambda: calls.append(1) or Item({}, {"acc": 2.0}))
    assert not computed and calls == [1] and item.meta == {"acc": 1.0}


def _compute_once(root: str, log: str, start: float) -> None:
    while time.time() < start:  # both processes ask at the same moment
        time.sleep(0.001)
    st = Stage.of(root, "slow", MODEL, {})

    def compute() -> Item:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        return Item({"x": torch.ones(3)}, {"by": os.getpid()})

    st.get_or_compute("item", compute)


def test_concurrent_processes_compute_an_item_once(tmp_path):
    log = tmp_path / "computed.log"
    start = time.time() + 1.0
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_compute_once, args=(str(tmp_path / "store"), str(log), start)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(log.read_text().split()) == 1  # one computed, the other waited and found it
    assert Stage.of(str(tmp_path / "store"), "slow", MODEL, {}).load("item") is not None


def _tiny_dir(path: Path, seed: int) -> str:
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_store_is_found_or_recomputed_as_its_inputs_say(ray_session, make_conf, tmp_path):
    """Same inputs: found. store.dtype: a new store. Other weights under the same model name: a new store."""
    path = _tiny_dir(tmp_path / "model", seed=0)
    texts = builtin_texts(12)
    conf = make_conf(f"model.name={path}", "ray.actors=1")
    runs = {}
    with ModelPool(conf) as pool:
        runs["first"] = extraction.extract(conf, texts, pool)
        runs["again"] = extraction.extract(conf, texts, pool)
        fp16 = make_conf(f"model.name={path}", "ray.actors=1", "store.dtype=float16")
        runs["fp16"] = extraction.extract(fp16, texts, pool)
    _tiny_dir(tmp_path / "model", seed=1)  # same name and path, new weights
    with ModelPool(conf) as pool:
        runs["new_weights"] = extraction.extract(conf, texts, pool)
    assert runs["again"].url == runs["first"].url and runs["again"].chunks_computed == 0
    assert runs["fp16"].url != runs["first"].url and runs["fp16"].chunks_computed == 2
    assert runs["new_weights"].url not in {runs["first"].url, runs["fp16"].url}
    assert runs["new_weights"].chunks_computed == 2
    # the new store holds the new model's states: layer 0 (embeddings) of the first prompt, by a plain forward
    lm = load_model(conf.model)
    ids = lm.tokenizer(texts[0], return_tensors="pt", truncation=True, max_length=conf.data.max_tokens)["input_ids"]
    with torch.no_grad():
        want = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[1][0, -1].numpy()
    got = zarr.open_group(runs["new_weights"].url, mode="r")["resid"][0, 1]
    assert np.abs(got - want).max() <= 1e-4


def test_two_concurrent_runs_share_one_store_equal_to_a_clean_run(tmp_path, tracking_uri):
    def cmd(root: Path) -> list[str]:
        sets = ["model.name=tiny-gpt2", f"store.root={root}", f"tracking.uri={tracking_uri}", "ray.actors=1",
                "data.max_prompts=40", "data.max_tokens=16", "store.chunk_size=4"]
        return [sys.executable, "-m", "lensflow.flows.cli", "run", "extract", *[a for s in sets for a in ("--set", s)]]

    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).search_experiments()  # the schema exists before two processes open the database
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    shared = tmp_path / "shared"
    procs = [subprocess.Popen(cmd(shared), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    assert subprocess.run(cmd(tmp_path / "clean"), capture_output=True, env=env, timeout=600).returncode == 0
    (got,), (want,) = [list(Path(r, "activations").iterdir()) for r in (shared, tmp_path / "clean")]
    assert got.name == want.name  # same key: both concurrent runs wrote into the one store
    g, w = zarr.open_group(str(got), mode="r"), zarr.open_group(str(want), mode="r")
    assert g.attrs["complete"] and (g["done"][:] == 1).all()
    for name in ("resid", "token_ids", "lengths"):
        assert np.array_equal(g[name][:], w[name][:]), name


def test_model_identity_is_fixed_at_load(tiny_lms):
    """A padded, truncated encode rewrites the tokenizer's serialised form (and so its hash): the identity stages are
    keyed by is the loaded model's, whatever the actor encoded before it was first asked."""
    lm = load_model(ModelConf(name="tiny-llama"))
    before = tokenizer_hash(lm.tokenizer)
    lm.tokenizer(["hello there", "a"], padding=True, truncation=True, max_length=3)
    assert tokenizer_hash(lm.tokenizer) != before  # what made two actors of one model disagree
    assert lm.id.tokenizer_hash == before == tiny_lms["llama"].id.tokenizer_hash
