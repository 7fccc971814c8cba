"""The store against independent transformers forward passes; resume and actor death on a real local Ray."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import zarr
from loopback import wait_until

from lensflow.tasks.core import extraction, store
from lensflow.tasks.core.actors import ModelPool
from lensflow.tasks.core.models import load_model
from lensflow.tasks.core.prompts import builtin_texts


def reference(conf, texts, layers, positions="last"):
    """Plain HF forward with output_hidden_states, one prompt at a time (no padding, no hooks)."""
    lm = load_model(conf.model)
    out = []
    for text in texts:
        ids = lm.tokenizer(text, return_tensors="pt", truncation=True, max_length=conf.data.max_tokens)["input_ids"]
        with torch.no_grad():
            hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
        states = [hs[l] if l < lm.n_layers else None for l in layers]
        if lm.n_layers in layers:  # HF normalises the last entry; recover the pre-norm stream from the block output
            with torch.no_grad():
                captured = {}
                h = lm.blocks[-1].register_forward_hook(lambda m, a, o: captured.setdefault("x", o[0] if isinstance(o, tuple) else o))
                lm.model(input_ids=ids)
                h.remove()
            torch.testing.assert_close(lm.final_norm(captured["x"]), hs[-1])
            states[layers.index(lm.n_layers)] = captured["x"]
        s = torch.stack([x[0] for x in states], dim=1)  # [T, L, d]
        out.append(s[-1] if positions == "last" else s)
    return out


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2", "tiny-gemma3"])
def test_store_matches_plain_forward(ray_session, make_conf, model):
    conf = make_conf(model=model)
    texts = builtin_texts(20)
    with ModelPool(conf) as pool:
        ex = extraction.extract(conf, texts, pool)
    acts = store.Activations(ex.url)
    assert acts.n == 20 and acts.layers == list(range(5)) and ex.chunks_computed == 3
    ref = torch.stack(reference(conf, texts, acts.layers)).numpy()
    got = acts.resid[:]
    assert np.abs(got - ref).max() <= 1e-4
    assert acts.texts() == texts
    lengths = acts.lengths
    ids = acts.token_ids[:]
    assert ((ids >= 0).sum(1) == lengths).all() and lengths.max() == conf.data.max_tokens


def test_all_positions_heads_subset_fp16(ray_session, make_conf):
    conf = make_conf("store.positions=all", "store.layers=[0, 2, 4]", "store.sites=[resid, attn_head]",
                     "store.dtype=float16")
    texts = builtin_texts(10)
    with ModelPool(conf) as pool:
        url = extraction.extract(conf, texts, pool).url
    acts = store.Activations(url)
    assert acts.resid.dtype == np.float16 and acts.resid.shape == (10, 16, 3, 64)
    assert acts.blocks == [0, 2] and acts.group["attn_head"].shape == (10, 16, 2, 4, 16)
    ref = reference(conf, texts, [0, 2, 4], positions="all")
    for i, r in enumerate(ref):
        n = r.shape[0]
        assert np.abs(acts.resid[i, :n].astype(np.float32) - r.numpy()).max() < 2e-2  # fp16 storage
        assert not acts.resid[i, n:].any()  # padding stays zero
    assert np.array_equal(acts.layer(2, slice(0, 3)), acts.resid[0:3, :, 1].astype(np.float32))


def _chunk_mtimes(url: str) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in Path(url, "resid", "c").rglob("*") if p.is_file()}


def test_resume_recomputes_only_missing_chunks(ray_session, make_conf):
    conf = make_conf("data.max_prompts=40")
    texts = builtin_texts(40)
    with ModelPool(conf) as pool:
        url = extraction.extract(conf, texts, pool).url
        clean = {k: zarr.open_group(url)[k][:] for k in ("resid", "token_ids", "lengths")}
        # an interrupted run: two chunks never finished (their done flags unset, data half-written garbage)
        g = zarr.open_group(url, mode="r+")
        g.attrs["complete"] = False
        for c in (1, 3):
            g["done"][c] = 0
            g["resid"][c * 8:(c + 1) * 8] = 123.0
        with pytest.raises(ValueError, match="unfinished"):
            store.Activations(url)
        before = _chunk_mtimes(url)
        time.sleep(0.05)
        again = extraction.extract(conf, texts, pool)
    assert again.url == url and again.chunks_computed == 2 and again.chunks_resumed == 3
    after = _chunk_mtimes(url)
    rewritten = {p for p in before if after[p] != before[p]}
    assert rewritten and all(Path(p).parts[-3] in ("1", "3") for p in rewritten), rewritten
    for k, v in clean.items():
        assert np.array_equal(zarr.open_group(url)[k][:], v)


def _pid_once_up(actor) -> int | None:
    """Calls to a restarting actor fail at once (ModelPool redoes their items elsewhere)."""
    try:
        return ray.get(actor.pid.remote())
    except ray.exceptions.ActorUnavailableError:
        return None


def test_killed_actor_is_replaced_and_store_completes(ray_session, make_conf):
    conf = make_conf("ray.actors=2", "data.max_prompts=400", "store.chunk_size=4", "ray.cpus_per_actor=0.5")
    texts = builtin_texts(400)
    result = {}
    with ModelPool(conf) as pool:
        victim = pool.actors[0]
        pid = ray.get(victim.pid.remote())
        worker = threading.Thread(target=lambda: result.update(ex=extraction.extract(conf, texts, pool)))
        worker.start()
        done_at_kill = None
        while worker.is_alive() and done_at_kill is None:  # kill once the store shows real progress
            try:
                done = int(sum(zarr.open_group(Path(conf.store.root, "activations").glob("*").__next__(), mode="r")["done"][:]))
            except (StopIteration, FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
                done = 0
            if done >= 3:
                os.kill(pid, 9)
                done_at_kill = done
            time.sleep(0.005)
        worker.join()
        assert done_at_kill is not None and done_at_kill < 100  # killed mid-run
        assert wait_until(lambda: _pid_once_up(victim), 60, "the restarted actor") != pid  # Ray restarted it
    acts = store.Activations(result["ex"].url)
    assert result["ex"].chunks_total == 100 and (acts.group["done"][:] == 1).all()
    sample = list(range(0, 400, 7))  # every 7th prompt touches every chunk's neighbourhood, at a fraction of the cost
    ref = torch.stack(reference(conf, [texts[i] for i in sample], acts.layers)).numpy()
    assert np.abs(acts.resid[:][sample] - ref).max() <= 1e-4
