"""The `causal_trace` config section."""

from __future__ import annotations

from pydantic import Field

from lensflow.tasks.core.config import Section


class CausalTraceConf(Section):
    """Causal tracing (Meng et al. 2022): corrupt the subject, restore one clean state, measure P(answer) back."""

    facts_file: str | None = None  # JSONL of {"prompt", "subject", "target"[, "relation"]}; None = shipped facts
    filter_correct: bool = True  # trace only facts whose greedy first token is the answer's (as the paper)
    max_facts: int | None = Field(default=12, gt=0)  # traced facts after the filter, taken round-robin over relations
    samples: int = Field(default=3, gt=0)  # noise draws per fact (paper: 10)
    noise_scale: float = Field(default=3.0, ge=0)  # noise std = this x std of the input embedding matrix (paper: 3)
    window: int = Field(default=10, gt=0)  # MLP / attention outputs restored over this many layers (paper: 10)
    seed: int = 0  # noise draws, seeded per fact
    batch_tokens: int = Field(default=8192, gt=0)  # most tokens per restoration forward pass (memory, not results)
