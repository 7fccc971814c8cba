"""The `lenses` config section."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from lensflow.tasks.core.config import Section


class LensesConf(Section):
    """Logit lens + tuned lens (Belrose et al. 2023), trained on every position of the first max_prompts
    data.* texts (a positions=all store); the last heldout share of those prompts is the evaluation split."""

    max_prompts: int | None = Field(default=160, gt=0)  # None = data.max_prompts
    heldout: float = Field(default=0.2, gt=0, lt=1)
    epochs: int = Field(default=2, gt=0)
    batch_tokens: int = Field(default=64, gt=0)
    lr: float = Field(default=2e-3, gt=0)  # AdamW, linear decay to zero
    weight_decay: float = Field(default=0.0, ge=0)
    # the frozen unembedding matmuls while training: auto = the faster of the two on the machine that trains
    # (float32 where bfloat16 is not native; tasks/core/kernels.py), recorded with each translator
    compute_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    seed: int = 0
    # GPUs per lens Ray task (targets per chunk, translator per layer); auto = 0.25 where the cluster has GPUs, else 0
    gpus_per_task: Annotated[float, Field(ge=0)] | Literal["auto"] = "auto"
    grid_prompt: str = "The Eiffel Tower is in the city of Paris, which is the capital of"
