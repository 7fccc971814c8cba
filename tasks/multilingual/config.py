"""The `multilingual` config section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from lensflow.tasks.core.config import Section
from lensflow.tasks.core.dictionaries.config import TranscoderConf

# language codes the experiment knows: the shipped corpus and antonym set have each of them, so a typo fails here
# instead of as a missing file; a user's own `files` may hold any subset of them
LANGUAGES = ("en", "fr", "es", "de", "zh")


class MultilingualConf(Section):
    """Shared multilingual features (Anthropic 2025): per-layer SAEs, then cross-language active-set overlap."""

    class SAE(Section):
        activation: Literal["topk", "relu"] = "topk"
        expansion: int = Field(default=4, gt=0)  # width = expansion * d_model
        k: int = Field(default=32, gt=0)  # topk: active features per token
        l1: float = Field(default=1e-3, ge=0)  # relu: L1 coefficient on the (unit-decoder) codes
        steps: int = Field(default=300, gt=0)
        batch_tokens: int = Field(default=1024, gt=0)
        lr: float = Field(default=1e-3, gt=0)
        train_prompts: int = Field(default=512, gt=1)  # general-text prompts whose every token is a sample
        holdout: float = Field(default=0.1, gt=0, lt=1)  # last fraction of prompts, for variance explained
        # parallel paragraphs (a seeded choice of indices, the same in every language) that train the SAE beside
        # the general text and are never measured: an English-only SAE reconstructs other languages poorly
        train_paragraphs: int = Field(default=50, ge=0)  # of the 120 shipped lines: 70 stay measured
        general_share: float = Field(default=0.25, ge=0, le=1)  # of training tokens; the rest: languages, equally
        # a folder of pretrained SAEs in the SAELens layout, one subfolder `layer_LL` (cfg.json +
        # sae_weights.safetensors) per resid layer: used instead of training (tasks/core/dictionaries/saelens.py)
        pretrained: str | None = None

    class Neurons(Section):
        enabled: bool = True
        quantile: float = Field(default=0.99, gt=0, lt=1)  # active = above this per-neuron quantile on general text
        threshold: float | None = None  # absolute threshold instead of the calibrated quantile
        calibration_prompts: int = Field(default=64, gt=0)
        batch_prompts: int = Field(default=16, gt=0)  # texts per actor call (neuron activations are large)

    class Pages(Section):
        """Feature pages (tasks/core/dictionaries/pages.py), bounded: per layer the features active in every
        language and, per language, the ones active mostly on it, measured on the measured parallel paragraphs."""

        enabled: bool = True
        multilingual: int = Field(default=8, ge=0)  # features per layer with the highest lowest per-language rate
        specific: int = Field(default=4, ge=0)  # per language and layer: rate on it minus its rate anywhere else
        contexts: int = Field(default=8, gt=0)  # top activating texts per feature
        tokens: int = Field(default=10, gt=0)  # promoted (and suppressed) output tokens per feature
        min_density: float = Field(default=1e-4, ge=0, lt=1)  # rarer features are never chosen

    class Transcoders(Section):
        """Per-block transcoders (the core's stage, tasks/core/dictionaries/transcoder_stage.py) trained on every
        language's training paragraphs and the general text, then measured per language and for overlap."""

        enabled: bool = True
        train: TranscoderConf = TranscoderConf()

    # the model this flow runs when the run config names none (model.name unset): Gemma 3 270M is multilingual, SmolLM2
    # (the default of every other flow) answers the seed's prompts in English only; an explicit model.name wins, and
    # null defers to model.name (plan.resolve_model)
    model: str | None = "gemma3-270m"
    languages: list[str] = list(LANGUAGES)
    pairs: list[str] | None = None  # ["en-fr", ...]; None = every pair of `languages`
    files: dict[str, str] | None = None  # {lang: aligned .txt, one paragraph per line}; None = shipped corpus
    max_paragraphs: int | None = Field(default=None, gt=1)
    paragraph_tokens: int = Field(default=128, gt=1)  # paragraphs are truncated to this many tokens
    layers: list[int] | None = None  # resid layers; None = every `layer_stride`-th layer from 0, plus the last
    layer_stride: int = Field(default=3, gt=0)
    skip_first: bool = True  # drop each text's first token (BOS / attention sink) from training and active sets
    seed: int = 0
    sae: SAE = SAE()
    neurons: Neurons = Neurons()
    pages: Pages = Pages()
    transcoders: Transcoders = Transcoders()

    @field_validator("languages")
    @classmethod
    def _known_languages(cls, v: list[str]) -> list[str]:
        unknown = [lang for lang in v if lang not in LANGUAGES]
        if unknown:
            raise ValueError(f"unknown language code(s) {unknown} (known: {', '.join(LANGUAGES)})")
        if len(set(v)) != len(v):
            raise ValueError("a language is listed twice")
        return v
