"""The embedded Gemma 3 270M: assembled from its chunk packages once (two processes at once included), its store
equal to a plain transformers forward at every resid layer, and sensible multilingual answers."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lensflow.tasks.core import extraction, store
from lensflow.tasks.core.actors import ModelPool
from lensflow.tasks.core.prompts import builtin_texts

pytestmark = pytest.mark.integration

# the SHA-256 of gemma-3-270m-q4_k_m.gguf, from the package's data/SHA256SUMS
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def test_two_processes_assembling_at_once_get_one_checked_file(tmp_path):
    code = "from lensflow.tasks.core.models import _embedded_gguf; print(_embedded_gguf('gemma3-270m'))"
    env = {**os.environ, "LENSFLOW_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    paths = {out.strip() for out, _ in outs}
    assert paths == {str(tmp_path / "gguf" / "gemma-3-270m-q4_k_m.gguf")}
    path = Path(paths.pop())
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    assert h.hexdigest() == GGUF_SHA256
    assert sorted(p.name for p in path.parent.iterdir()) == [".gemma-3-270m-q4_k_m.gguf.lock", path.name]  # no leftovers
    mtime = path.stat().st_mtime_ns
    again = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env, timeout=120)
    assert again.stdout.strip() == str(path) and path.stat().st_mtime_ns == mtime  # idempotent: not rewritten


def test_a_conversion_reads_each_gguf_once_and_leaves_the_reader_as_it_was(tmp_path):
    import gguf

    from lensflow.tasks.core.models import one_gguf_parse

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(100)])
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        write()
    writer.close()
    plain = gguf.GGUFReader
    with one_gguf_parse():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first  # the loader's second and third reads
        assert len(first.fields["tokenizer.ggml.tokens"].data) == 100
        np.testing.assert_array_equal(first.tensors[0].data, np.arange(12, dtype=np.float32).reshape(3, 4))
    assert gguf.GGUFReader is plain and gguf.GGUFReader(path) is not first


def test_gemma3_store_matches_plain_forward(ray_session, make_conf, gemma3):
    conf = make_conf("data.max_tokens=32", "data.max_prompts=8", model="gemma3-270m")
    texts = builtin_texts(8)
    with ModelPool(conf) as pool:
        url = extraction.extract(conf, texts, pool).url
    acts = store.Activations(url)
    lm = gemma3
    assert lm.model.config.model_type == "gemma3_text" and (lm.n_layers, lm.d_model) == (18, 640)
    assert acts.resid.shape == (8, 19, 640) and acts.attrs["model"] == "gemma3-270m"
    worst = 0.0
    for i, text in enumerate(texts):
        ids = lm.tokenizer(text, return_tensors="pt", truncation=True, max_length=32)["input_ids"]
        with torch.no_grad():
            hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
        ref = torch.stack([h[0, -1] for h in hs[:-1]]).numpy()  # layers 0..17: identical definitions
        scale = np.abs(ref).max(-1, keepdims=True)  # Gemma's stream is large (embeddings scaled by sqrt(640))
        worst = max(worst, float((np.abs(acts.resid[i, :18] - ref) / scale).max()))
        # layer 18 is stored before the final norm; HF's last entry is after it
        normed = lm.final_norm(torch.from_numpy(acts.resid[i, 18]))
        assert (normed - hs[-1][0, -1]).abs().max() <= 1e-3
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("prompt, answers", [
    ('The opposite of "small" is "', ("large", "big")),
    ('Le contraire de "petit" est "', ("grand",)),
    ('El contrario de "pequeño" es "', ("grande",)),
])
def test_greedy_antonyms(gemma3, prompt, answers):
    ids = gemma3.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = gemma3.model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert gemma3.tokenizer.decode(out[0, ids.shape[1]:]).startswith(answers)
