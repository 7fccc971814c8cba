"""GPU paths checked on the CPU (no GPU is lent to CI): device and dtype rules, the Ray-assigned-GPU refusal with a
real Ray node that declares a GPU it cannot start, KV caches only where asked for, device-following trainers, loss
scaling through a float16 model, and the paper config's pins. Budget: under 30 s."""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch
import yaml

from lensflow.tasks.core.config import ConfigError, ModelConf
from lensflow.tasks.core.devices import (
    AUTO_TASK_GPUS,
    choose_device,
    loss_scaler,
    task_gpus,
)
from lensflow.tasks.core.models import (
    LM,
    arch_for,
    load_model,
    tiny_config,
    tiny_tokenizer,
)
from lensflow.tasks.future_lens.samples import Block
from lensflow.tasks.future_lens.soft_prompt import prompt_embeddings, train_soft_prompt
from lensflow.tasks.future_lens.vocab_probe import VocabProbe
from lensflow.tasks.registry import load_config

ROOT = Path(__file__).resolve().parent.parent


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_device_rules():
    assert choose_device("cpu", True, [0]).type == "cpu"  # asked for explicitly
    assert choose_device("auto", True, []).type == "cuda"
    assert choose_device("auto", False, []).type == "cpu"  # no GPU anywhere: the CPU, as the demo runs
    with pytest.raises(ConfigError) as err:
        choose_device("auto", False, [3])  # Ray gave this worker GPU 3, CUDA did not start
    assert "Ray assigned GPU(s) [3]" in _one_line(err) and "refusing to run on the CPU" in str(err.value)
    with pytest.raises(ConfigError) as err:
        choose_device("cuda", False, [])
    assert _one_line(err).startswith("model.device=cuda: CUDA is not available")


def test_float16_refused_on_cpu():
    with pytest.raises(ConfigError) as err:  # said in the config: refused before anything starts
        load_config(None, ["model.device=cpu", "model.dtype=float16"])
    assert _one_line(err).startswith("config key 'model.device': model.dtype=float16 needs a GPU")
    if not torch.cuda.is_available():  # device auto resolves to the CPU here: refused before weights load
        with pytest.raises(ConfigError) as err:
            load_model(ModelConf(name="tiny-llama", dtype="float16"))
        assert _one_line(err).startswith("model.dtype=float16 on a CPU")
    lm = load_model(ModelConf(name="tiny-llama", dtype="bfloat16", device="cpu"))  # bfloat16 is fine on a CPU
    assert lm.dtype == torch.bfloat16 and lm.device.type == "cpu"


def test_gpu_task_requests():
    assert task_gpus("auto", 8, "k") == AUTO_TASK_GPUS < 1 and task_gpus("auto", 0, "k") == 0.0
    assert task_gpus(0.5, 1, "k") == 0.5 and task_gpus(0, 0, "k") == 0.0
    with pytest.raises(ConfigError) as err:
        task_gpus(1, 0, "future_lens.gpus_per_task")  # Ray would wait forever
    assert _one_line(err) == "future_lens.gpus_per_task=1: the cluster has 0 GPUs"
    conf = load_config(None, [])
    assert conf.lenses.gpus_per_task == "auto" and conf.future_lens.gpus_per_task == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA cannot start")
def test_ray_assigned_gpu_without_cuda_refuses_the_cpu(tmp_path):
    """A real Ray node that declares one GPU (as a GPU node whose CUDA is broken would): the task Ray gives that GPU
    must refuse, not load the model on the CPU. On the same node, map_remote's GPU tasks share a GPU and reuse their
    worker (Ray's default for GPU tasks is a new process, imports and CUDA context per call)."""
    script = textwrap.dedent("""
        import os, ray
        from lensflow.tasks.core.ray_cluster import loopback_only
        loopback_only()
        ray.init(address="local", num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False)

        @ray.remote(num_gpus=1)
        def load():
            from lensflow.tasks.core.config import ConfigError, ModelConf
            from lensflow.tasks.core.models import load_model
            try:
                load_model(ModelConf(name="tiny-llama"))
            except ConfigError as exc:
                return ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"), str(exc)
            return ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"), "loaded"

        from lensflow.tasks.core.actors import map_remote
        from lensflow.tasks.core.config import RayConf
        from lensflow.tasks.core.devices import task_gpus
        workers = map_remote(lambda _: (os.getpid(), ray.get_gpu_ids()), range(6), "gpu tasks", RayConf(),
                             num_gpus=task_gpus("auto", 1, "k"))
        print(repr((*ray.get(load.remote(), timeout=90), workers)))
        ray.shutdown()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    gpu_ids, visible, message, workers = eval(out.stdout.strip().splitlines()[-1])
    assert all(ids == [0] for _, ids in workers) and len({pid for pid, _ in workers}) <= 2  # 6 tasks, 1 CPU
    assert gpu_ids == [0] and visible == "0"
    assert message.startswith("Ray assigned GPU(s) [0] to this worker but CUDA is not available") and "\n" not in message


def test_kv_cache_only_when_asked(tiny_lms):
    lm = tiny_lms["llama"]
    ids = torch.tensor([[5, 6, 7, 8]])
    assert lm.model.config.use_cache is False
    assert lm.base(input_ids=ids).past_key_values is None  # scans, extraction, lens passes: no cache kept
    assert lm.model(input_ids=ids).past_key_values is None
    assert lm.base(input_ids=ids, use_cache=True).past_key_values is not None  # continuations that reuse it


def test_vocab_probe_follows_the_device_of_its_input():
    """On the meta device (shapes only, no data): every tensor the probe creates must be on its input's device;
    a CPU-created tensor mixed with GPU inputs fails the same way on a GPU."""
    d, v, r, n_future, vocab_size = 8, 5, 3, 2, 20
    probe = VocabProbe(torch.zeros(d), torch.ones(d), torch.randn(r, d), torch.randn(n_future, v, r),
                       torch.zeros(n_future, v), torch.arange(v) * 3).to("meta")
    out = probe.logprobs(torch.randn(4, d, device="meta"), 1, vocab_size)
    assert out.device.type == "meta" and out.shape == (4, vocab_size)


def _tiny_llama_on_cpu() -> LM:
    """tiny-llama on the CPU, built directly so the test may cast it to float16 (load_model refuses float16 on a
    CPU for real runs): the loss-scaling path is the same code a GPU runs."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    cfg = tiny_config("llama", vocab_size=len(tok))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.config.use_cache = False
    model.eval().requires_grad_(False)
    return LM(model=model, tokenizer=tok, name="tiny-llama", weights_hash="x", spec=arch_for("llama", "tiny-llama"))


def test_soft_prompt_trains_through_a_float16_model_with_loss_scaling():
    assert loss_scaler(torch.float16, torch.device("cpu")).is_enabled()
    assert not loss_scaler(torch.bfloat16, torch.device("cpu")).is_enabled()
    assert not loss_scaler(torch.float32, torch.device("cpu")).is_enabled()
    lm32, lm16 = _tiny_llama_on_cpu(), _tiny_llama_on_cpu()
    lm16.model.half()
    g = torch.Generator().manual_seed(1)
    d = lm32.d_model
    batches = [Block(h=torch.randn(4, d, generator=g), greedy=torch.randint(0, 200, (4, 2), generator=g),
                     final=torch.randn(4, 2, d, generator=g)) for _ in range(3)]
    init = prompt_embeddings(lm32, "Tell me", 3).float()
    p32, l32 = train_soft_prompt(lm32, 2, iter(batches), init, 3, 0.1)
    p16, l16 = train_soft_prompt(lm16, 2, iter(batches), init, 3, 0.1)
    assert p16.dtype == torch.float32 and torch.isfinite(p16).all()  # float32 master weights came back
    assert (p16 - init).abs().max() > 0  # the steps were taken (a skipped overflow step leaves it unchanged)
    # the float16 run follows the float32 one (an independent computation of the same training)
    assert abs(l16[0] - l32[0]) < 0.05 * abs(l32[0]) + 1e-3
    assert (p16 - p32).abs().max() < 0.1 * (p32 - init).abs().max() + 1e-3
    # a step whose float16 pass overflows (a state beyond float16's range) is skipped, and training goes on; without
    # the scaler its NaN gradient would reach the float32 prompt and every later step
    overflow = dataclasses.replace(batches[0], h=torch.full((4, d), 1e5))
    p, losses = train_soft_prompt(lm16, 2, iter([overflow, *batches[:2]]), init, 3, 0.1)
    assert math.isnan(losses[0]) and all(math.isfinite(x) for x in losses[1:])
    assert torch.isfinite(p).all() and (p - init).abs().max() > 0


def test_paper_config_pins_and_extras():
    conf = yaml.safe_load((ROOT / "conf" / "gptj-6b.yaml").read_text())
    assert re.fullmatch(r"[0-9a-f]{40}", conf["model"]["revision"])  # a commit, not a moving branch
    assert conf["data"]["hf_dataset"].startswith("monology/pile")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("zstandard") for dep in extras["hf"])  # the Pile's .jsonl.zst files
