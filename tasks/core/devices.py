"""Where computation runs and in which precision: the rules every GPU path follows, in one place.

- A process that Ray gave a GPU runs on it or stops: CUDA failing to start (a CPU-only torch, a driver mismatch)
  must not turn a GPU run into a silent CPU run that is 100x slower.
- float16 needs a GPU: CPU float16 kernels are slow or missing, and bfloat16 or float32 is what a CPU run wants.
- Training through a float16 model keeps float32 master weights and scales the loss (`loss_scaler`), because
  gradients below float16's ~6e-8 vanish on the way back; bfloat16 has float32's range and needs no scaling.
- Model-free Ray tasks (lens targets and translators, vocabulary probes) ask for GPUs where the cluster has
  them (`task_gpus`), and create what they train on the device of the batches they get.
"""

from __future__ import annotations

import os

import torch

from lensflow.tasks.core.config import ConfigError


def ray_gpu_ids() -> list:
    """GPUs Ray assigned to this process (empty outside a Ray worker, or when none was assigned)."""
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency; a bare torch environment still works
        return []
    return list(ray.get_gpu_ids()) if ray.is_initialized() else []


def choose_device(requested: str, cuda_ok: bool, assigned_gpus: list) -> torch.device:
    """`model.device` (auto, cpu, cuda) against what this process has: cuda if asked for or assigned, and an
    error in one line when CUDA cannot start although a GPU was asked for or assigned."""
    if requested == "cpu":
        return torch.device("cpu")
    if cuda_ok:
        return torch.device("cuda")
    if requested == "cuda":
        raise ConfigError(f"model.device=cuda: CUDA is not available here (torch {torch.__version__}, "
                          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    if assigned_gpus:
        raise ConfigError(f"Ray assigned GPU(s) {assigned_gpus} to this worker but CUDA is not available "
                          f"(torch {torch.__version__} built for CUDA {torch.version.cuda}): refusing to run on the CPU; "
                          "install a CUDA build of torch on GPU nodes or set ray.gpus_per_actor=0")
    return torch.device("cpu")


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """float16 only on a GPU (see the module docstring)."""
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("model.dtype=float16 on a CPU: use float32 or bfloat16 there (float16 is for GPUs)")


def compute_device() -> torch.device:
    """The device of a model-free Ray task or an actor: the GPU Ray gave it, else the CPU (never a silent CPU
    fallback when a GPU was assigned)."""
    return choose_device("auto", torch.cuda.is_available(), ray_gpu_ids())


def model_device(requested: str, dtype: torch.dtype) -> torch.device:
    """Where load_model puts the model; refuses float16 on a CPU."""
    device = choose_device(requested, torch.cuda.is_available(), ray_gpu_ids())
    check_dtype(dtype, device)
    return device


def loss_scaler(dtype: torch.dtype, device: torch.device) -> torch.amp.GradScaler:
    """Dynamic loss scaling for training through a float16 model (fp32 master weights: the scaler unscales their
    gradients and skips a step whose gradients overflowed); a no-op for bfloat16 and float32."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


# what `auto` gives a lens or probe task on a GPU cluster: a quarter of a GPU, so four per-layer jobs share one (at
# GPT-J shapes a translator or vocabulary probe needs < 2 GB; a whole GPU each ran one layer at a time)
AUTO_TASK_GPUS = 0.25


def task_gpus(requested: float | str, available: float, key: str) -> float:
    """GPUs per model-free Ray task: `auto` = AUTO_TASK_GPUS where the cluster has GPUs, else 0 (the CPU); a
    number is checked against the cluster, because Ray waits forever for GPUs that do not exist."""
    if requested == "auto":
        return AUTO_TASK_GPUS if available >= 1 else 0.0
    if requested > available:
        raise ConfigError(f"{key}={requested:g}: the cluster has {available:g} GPUs")
    return float(requested)


def cluster_gpus() -> float:
    """GPUs of the connected Ray cluster (call after ray_cluster.connect)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0))
