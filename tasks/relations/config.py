"""The `lre` config section."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from lensflow.tasks.core.config import Section


class LreConf(Section):
    """Linear relational embeddings (Hernandez et al. 2024): a relation as an affine map from subject to object state."""

    relations: str | None = None  # a folder of the paper's relation JSON files, or one file; None = the shipped set
    only: list[str] | None = None  # relation names to run (None = every relation, up to max_relations)
    max_relations: int | None = Field(default=8, gt=0)  # taken round-robin over kinds (CPU demo size; None = all)
    n_train: int = Field(default=4, ge=2)  # samples whose Jacobians are averaged, also the in-context demos (paper: 8)
    n_dev: int = Field(default=6, ge=1)  # further training samples that choose beta, rank and layer
    max_test: int | None = Field(default=16, gt=0)  # held-out test subjects per relation (None = every one left)
    # resid layers of the subject state; None = n_layers // 7 and 2 n_layers // 7 (4 and 8 on SmolLM2's 30: a
    # depth-relative default, so a model of any depth passes the run's layer checks)
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, min_length=1)
    betas: list[Annotated[float, Field(gt=0)]] = Field(default=[1.0, 2.0, 4.0, 8.0], min_length=1)  # W scale grid
    ranks: list[Annotated[int, Field(gt=0)]] = Field(default=[16, 64, 256], min_length=1)  # pseudo-inverse ranks
    max_pairs: int = Field(default=16, gt=0)  # (subject, other object) pairs edited per split for causality
    # cotangents of one batched backward: memory only (the W is the same); SmolLM2's 576 at once add 0.7 GB per actor
    jacobian_rows: int = Field(default=256, gt=0)
    seed: int = 0  # which samples train, choose and test

    def layer_list(self, n_layers: int) -> list[int]:
        return self.layers if self.layers is not None else sorted({max(1, n_layers // 7), max(1, 2 * n_layers // 7)})
