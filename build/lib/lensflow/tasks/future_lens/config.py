"""The `future_lens` config section."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from lensflow.tasks.core.config import Section


class FutureLensConf(Section):
    """Future Lens (Pal et al. 2023). Samples are cut from data.* texts (tasks/future_lens/samples.py); every
    stage is found again under store.root by its key (tasks/future_lens/methods.py)."""

    min_prefix_tokens: int = Field(default=4, gt=0)  # samples: positions T >= this - 1 of each text (< data.max_tokens)
    n_train: int = Field(default=800, gt=0)  # caps, after the model-correct filter
    n_test: int = Field(default=200, gt=0)
    test_fraction: float = Field(default=0.2, gt=0, lt=1)  # share of texts held out (split by text, seeded)
    n_future: int = Field(default=4, ge=1, le=8)  # offsets N = 0..n_future-1
    ks: list[Annotated[int, Field(gt=0)]] = [1, 5, 10]  # Precision@k; must include 1 (the headline P@1)
    ngram_order: int = Field(default=4, ge=2)
    linear_layers: list[int] | None = None  # None = every resid layer 0..n_layers
    causal_layers: list[int] | None = None  # fixed/learned prompts; None = every causal_layer_stride-th, last included
    causal_layer_stride: int = Field(default=5, gt=0)
    ridge: list[float] = [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]  # relative penalties, chosen on a validation tenth of train
    hidden_kl_steps: int = Field(default=0, ge=0)  # optional KL fine-tune of the ridge map
    hidden_kl_lr: float = Field(default=1e-3, gt=0)
    vocab_rank: int = Field(default=64, gt=0)
    vocab_steps: int = Field(default=300, ge=0)
    vocab_lr: float = Field(default=3e-3, gt=0)
    vocab_batch: int = Field(default=256, gt=0)
    vocab_weight_decay: float = Field(default=1e-2, ge=0)
    fixed_prompts: list[Annotated[str, Field(min_length=1)]] = Field(
        default=['Hello! Could you please tell me more about "', "Tell me about"], min_length=1)
    soft_prompt_len: int = Field(default=10, gt=0)
    soft_prompt_init: str = 'Hello! Could you please tell me more about "'
    soft_prompt_steps: int = Field(default=80, ge=0)
    soft_prompt_batch: int = Field(default=16, gt=0)
    soft_prompt_lr: float = Field(default=0.1, gt=0)  # relative to the RMS of the initial prompt embeddings
    eval_batch: int = Field(default=50, gt=0)
    teacher_forcing: bool = True  # causal methods at N>0 see the model's greedy tokens; False = the lens's own
    # GPUs per model-free Ray task (vocabulary probes); auto = 0.25 where the cluster has GPUs (4 share one), else 0
    gpus_per_task: Annotated[float, Field(ge=0)] | Literal["auto"] = "auto"
    seed: int = 0

    @field_validator("ks")
    @classmethod
    def _has_one(cls, v: list[int]) -> list[int]:
        if 1 not in v:
            raise ValueError("must include 1: Precision@1 is what every figure and the best-layer choice use")
        return sorted(set(v))
