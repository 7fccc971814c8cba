"""The `circuits` config section."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from lensflow.tasks.core.config import Section
from lensflow.tasks.core.dictionaries.config import TranscoderConf

LANGUAGES = ("en", "fr", "es", "de", "zh")


class CircuitsConf(Section):
    """Attribution graphs from per-layer transcoders, and feature-space interventions on the antonym set."""

    model: str | None = "gemma3-270m"  # the flow's model unless model.name is set on the command line or in YAML
    languages: list[Literal["en", "fr", "es", "de", "zh"]] = Field(default=list(LANGUAGES), min_length=1)
    transcoder: TranscoderConf = TranscoderConf()
    texts_per_language: int = Field(default=24, gt=0)  # parallel-corpus paragraphs per language the transcoders see
    transcoders: str | None = None  # a transcoder stage folder (…/dictionaries/transcoders/KEY) instead of training
    # graphs: the antonym prompts of the first `graph_pairs` pairs in every language (or these prompts)
    prompts: list[str] | None = None
    graph_pairs: int = Field(default=1, ge=0)
    logit_share: float = Field(default=0.95, gt=0, le=1)  # top logits kept until their probabilities reach this
    max_logits: int = Field(default=10, gt=0)
    node_threshold: float = Field(default=0.8, gt=0, le=1)  # pruning: share of influence on the logits kept (nodes)
    edge_threshold: float = Field(default=0.98, gt=0, le=1)  # (edges)
    batch_rows: int = Field(default=64, gt=0)  # attribution targets per backward pass
    max_batch_tokens: int = Field(default=4096, gt=0)  # rows x prompt tokens per pass: long prompts get fewer rows
    # features whose incoming edges are computed, the most influential first (None = all: ~3000 on Gemma 3 270M
    # with k=16, about half an hour of one busy CPU core per graph)
    max_feature_rows: int | None = Field(default=384, gt=0)
    # MiB: a prompt whose graph (~64 bytes per computed row x node at the peak, attribution and pruning; rows =
    # max_feature_rows + the logits) would need more is refused before anything runs: nodes ~ tokens x layers x
    # (k + 1), so with 384 rows about 1,100 tokens on Gemma 3 270M with k=16 (every row, max_feature_rows=null: ~38)
    max_graph_mb: float = Field(default=8192, gt=0)
    supernodes: str | None = None  # YAML: name -> ["layer:id", ...]
    # transcoder feature pages of the graphs' features (transcoders/...), and supernodes proposed from them (language
    # profile, operand words) when circuits.supernodes is not given
    pages: bool = True
    # interventions (the seed's three experiments)
    intervene: bool = True
    pairs: int = Field(default=8, gt=0)  # antonym pairs per language in the intervention experiments
    layers: list[Annotated[int, Field(ge=0)]] | None = None  # blocks edited; None = the middle third
    group_size: int = Field(default=8, gt=0)  # features per group (language, operand, operation)
    strength: float = Field(default=1.0, ge=0)  # injected groups at strength x their mean activation; sweepable
    seed: int = 0

    def layer_list(self, n_layers: int) -> list[int]:
        return self.layers if self.layers is not None else list(range(n_layers // 3, 2 * n_layers // 3))
