"""Dictionary configs, importable without torch: the experiments' config sections use them, and the `lensflow`
command validates configs before anything heavy imports."""

from __future__ import annotations

from pydantic import Field

from lensflow.tasks.core.config import Section


class TranscoderConf(Section):
    """TopK transcoders from `mlp_in` to `mlp_out`, one per block. The defaults are sized for 2 busy CPU cores (one
    Adam step of a 2048-wide transcoder on Gemma 3 270M took 0.65 s there): small and short, see the README's
    figures for what they explain; on a GPU raise width and steps."""

    width: int = Field(default=1024, gt=0)  # features per layer
    k: int = Field(default=16, gt=0)  # active features per token
    steps: int = Field(default=400, gt=0)
    batch_tokens: int = Field(default=128, gt=0)
    lr: float = Field(default=2e-3, gt=0)
    max_tokens: int = Field(default=32, gt=1)  # each training text truncated to this many tokens
    holdout: float = Field(default=0.1, gt=0, lt=1)  # last share of texts: FVE, L0, dead and spliced-in loss
    batch_texts: int = Field(default=32, gt=0)  # texts per forward while reading pairs (memory only)
    seed: int = 0

    def params(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if k != "batch_texts"}
