"""The `edit` config section."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from lensflow.tasks.core.config import Section


class EditConf(Section):
    """Fact editing: ROME (Meng et al. 2022) and MEMIT (Meng et al. 2023) on CounterFact-style requests."""

    requests: str | None = None  # JSONL of CounterFact's fields; None = the shipped requests
    # MLP block ROME edits when no finished causal-trace stage names one; None = n_layers // 7 (4 on SmolLM2's 30)
    layer: int | None = Field(default=None, ge=0)
    layer_from_trace: bool = True  # take ROME's layer from a finished causal-trace stage (same model and settings)
    rome_edits: int = Field(default=10, ge=0)  # requests edited one at a time by ROME
    # MLP blocks MEMIT spreads over; None = the 5 blocks centred on the default ROME layer (2..6 on SmolLM2)
    memit_layers: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, min_length=1)
    # edits at once; each needs its own target value (~12 s on one CPU core): 50 keeps a 2-core run under 10 min,
    # the paper goes to 10,000 on a GPU
    memit_sizes: list[Annotated[int, Field(gt=0)]] = Field(default=[1, 10, 50], min_length=1)
    prefixes: int = Field(default=5, ge=1)  # context prefixes averaged for keys and values (the first is empty)
    steps: int = Field(default=20, gt=0)  # value optimisation steps (paper: 20)
    lr: float = Field(default=0.5, gt=0)  # Adam learning rate of the value delta (paper: 0.5)
    kl_factor: float = Field(default=0.0625, ge=0)  # weight of KL on "{subject} is a" (paper: 0.0625)
    weight_decay: float = Field(default=0.5, ge=0)  # on |delta|^2 / |v|^2 (paper: 0.5)
    clamp_norm: float = Field(default=4.0, gt=0)  # |delta| <= clamp_norm x |v| (paper: 4)
    cov_texts: int = Field(default=200, gt=0)  # paragraphs of the built-in text set for the key covariance
    cov_tokens: int = Field(default=64, gt=1)  # tokens per paragraph
    cov_weight: float = Field(default=15000.0, ge=0)  # MEMIT's lambda on the key covariance (paper: 15000)
    fluency_tokens: int = Field(default=32, gt=1)  # greedy tokens generated per prompt for the n-gram entropy
    fluency_prompts: int = Field(default=10, gt=0)  # edit prompts generated from per evaluation
    seed: int = 0  # which text paragraphs give prefixes and covariance

    def rome_layer(self, n_layers: int) -> int:
        return self.layer if self.layer is not None else n_layers // 7

    def memit_layer_list(self, n_layers: int) -> list[int]:
        if self.memit_layers is not None:
            return self.memit_layers
        c = n_layers // 7
        return [l for l in range(c - 2, c + 3) if 0 <= l < n_layers]
