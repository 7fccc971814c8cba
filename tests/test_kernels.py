"""The compute dtype of hot loops is chosen by the hardware and by timing, never assumed (tasks/core/kernels.py)."""

from __future__ import annotations

import json

import pytest
import torch

from lensflow.tasks.core import kernels

CPU = torch.device("cpu")
SHAPE = (16, 32, 64)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LENSFLOW_CACHE", str(tmp_path))
    return tmp_path / "kernels.json"


def test_a_cpu_without_native_bfloat16_gets_float32_without_timing(monkeypatch):
    """The AVX2-only EPYC case: no avx512_bf16 / amx_bf16 flag, so float32, and nothing is timed or cached."""
    monkeypatch.setattr(kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(kernels, "time_matmul", lambda *a: pytest.fail("timed although the flags rule bf16 out"))
    flags = {"sse4_2", "avx", "avx2", "fma", "avx512f"}  # AVX-512 without its BF16 extension is not enough
    assert kernels.compute_dtype("auto", CPU, SHAPE, flags=flags) is torch.float32
    assert not kernels.cpu_may_have_bf16(flags, "x86_64")
    assert kernels.cpu_may_have_bf16({"avx2", "amx_bf16"}, "x86_64")
    assert kernels.cpu_may_have_bf16({"fp", "asimd", "bf16"}, "aarch64")
    assert not kernels.cpu_may_have_bf16({"fp", "asimd"}, "aarch64")
    assert kernels.cpu_may_have_bf16(set(), "arm64")  # no /proc/cpuinfo (macOS): timing decides


def test_the_faster_kernel_wins_and_the_answer_is_cached_per_machine(monkeypatch, private_cache):
    """Where bfloat16 may be native, both are timed once at the loop's shape; the next call reads the cache."""
    monkeypatch.setattr(kernels.platform, "machine", lambda: "x86_64")
    timings = {"bfloat16": 1.756, "float32": 0.246}  # the EPYC figures: emulated bfloat16 is 7x slower
    calls = []

    def fake(dtype, m, k, n, device):
        calls.append((dtype, (m, k, n)))
        return timings[dtype]

    monkeypatch.setattr(kernels, "time_matmul", fake)
    native = {"avx2", "avx512_bf16"}
    assert kernels.compute_dtype("auto", CPU, SHAPE, flags=native) is torch.float32
    assert sorted(calls) == [("bfloat16", SHAPE), ("float32", SHAPE)]
    assert list(json.loads(private_cache.read_text()).values()) == ["float32"]
    assert kernels.compute_dtype("auto", CPU, SHAPE, flags=native) is torch.float32
    assert len(calls) == 2  # cached: not timed again
    timings.update(bfloat16=0.1)  # another shape is another key, timed afresh
    assert kernels.compute_dtype("auto", CPU, (8, 32, 64), flags=native) is torch.bfloat16
    assert len(calls) == 4


def test_explicit_choices_pass_through_and_ties_go_to_float32():
    assert kernels.compute_dtype("bfloat16", CPU, SHAPE, flags=set()) is torch.bfloat16
    assert kernels.compute_dtype("float32", CPU, SHAPE, flags={"avx512_bf16"}) is torch.float32
    assert kernels.fastest({"bfloat16": 1.0, "float32": 1.0}) == "float32"


def test_timing_runs_the_real_matmul_in_each_dtype():
    for dtype in kernels.CANDIDATES:
        assert kernels.time_matmul(dtype, *SHAPE, CPU) > 0
