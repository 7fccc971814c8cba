"""Which floating-point type a hot loop runs fastest in, on the device at hand: measured, not assumed.

bfloat16 matmuls are several times faster than float32 where the hardware has them (CPUs with AVX-512 BF16 or
AMX, GPUs from Ampere on) and several times slower where it is emulated: on an AVX2-only EPYC a [256 x 576] x
[576 x 49152] matmul took 1,756 ms in bfloat16 against 246 ms in float32. So `auto` asks the hardware first (a CPU
without native bfloat16 gets float32 without a test) and, where bfloat16 may win, times both at the loop's own
shapes once; the answer is cached per machine (LENSFLOW_CACHE/kernels.json), keyed by the CPU, torch and the
thread count, so later runs and every Ray worker on the node reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

CANDIDATES = ("bfloat16", "float32")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86: /proc/cpuinfo flags; aarch64 reports "bf16" in Features
REPEATS = 3


def cpu_flags() -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is missing, e.g. macOS: the timing then decides)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_may_have_bf16(flags: set[str], machine: str) -> bool:
    """False only where the flags say bfloat16 is emulated; unknown flags (no /proc/cpuinfo) leave it to timing."""
    if not flags:
        return True
    if machine in ("x86_64", "AMD64", "i686"):
        return any(f in flags for f in NATIVE_BF16_FLAGS)
    return "bf16" in flags


def fastest(timings: Mapping[str, float]) -> str:
    """The dtype with the lowest time; float32 on ties (it is the exact one)."""
    return min(timings, key=lambda d: (timings[d], d != "float32"))


def time_matmul(dtype: str, m: int, k: int, n: int, device: torch.device) -> float:
    """Best of REPEATS: forward and input-gradient of x [m, k] @ w [k, n], the shape of a frozen readout's step."""
    dt = getattr(torch, dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    w = torch.randn(k, n, generator=gen).to(device, dt)
    x = torch.randn(m, k, generator=gen).to(device, dt).requires_grad_(True)
    best = float("inf")
    for _ in range(REPEATS + 1):  # the first call warms up the kernels
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        (x @ w).float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
        x.grad = None
    return best


def _cache_file() -> Path:
    return Path(os.environ.get("LENSFLOW_CACHE", Path.home() / ".cache" / "lensflow")) / "kernels.json"


def _machine_key(device: torch.device, shape: tuple[int, int, int]) -> str:
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        flags = cpu_flags()
        where = f"{platform.machine()}:{platform.processor()}:{hashlib.sha1(' '.join(sorted(flags)).encode()).hexdigest()[:12]}"
    return f"{where}|torch {torch.__version__}|threads {torch.get_num_threads()}|{shape}"


def _cached(key: str, measure: Callable[[], str]) -> str:
    path = _cache_file()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache and cache[key] in CANDIDATES:
        return cache[key]
    cache[key] = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(tmp, path)  # concurrent workers: the last whole file wins, every one of them is right
    except OSError:
        pass  # a read-only home: measure again next time
    return cache[key]


def compute_dtype(requested: str, device: torch.device, shape: tuple[int, int, int],
                  flags: set[str] | None = None) -> torch.dtype:
    """`requested` (auto, bfloat16, float32) as the torch dtype to compute in on `device` at matmul `shape`
    (m, k, n). auto: float32 where the hardware has no native bfloat16, else whichever of the two is faster."""
    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.float32
    elif not cpu_may_have_bf16(cpu_flags() if flags is None else flags, platform.machine()):
        return torch.float32

    def measure() -> str:
        return fastest({d: time_matmul(d, *shape, device) for d in CANDIDATES})

    return getattr(torch, _cached(_machine_key(device, shape), measure))
