"""Feature pages of the multilingual SAEs: each layer's dictionary read on the measured parallel paragraphs (one
source per language), so a page's language profile says whether the feature is shared across languages or one
language's own, the split the next experiment intervenes on. The pages themselves are the core's
(tasks/core/dictionaries/pages.py); this module says which texts and dictionaries feed them and where they are kept.

Each layer's page data is a stage item keyed by the SAE stage, the paragraph stores and the page settings. Top
output tokens need the unembedding and token strings need the tokenizer, so the data is gathered in a model actor;
a rerun that finds every item starts none (`build_pages`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from lensflow.tasks.core.actors import ModelPool
from lensflow.tasks.core.config import Config
from lensflow.tasks.core.dictionaries.autoencoder import SparseAutoencoder
from lensflow.tasks.core.dictionaries.pages import LayerPages, TextCodes, from_dict, layer_pages, store_codes
from lensflow.tasks.core.models import LM
from lensflow.tasks.core.stages import Item, Stage
from lensflow.tasks.core.store import Activations
from lensflow.tasks.multilingual.config import MultilingualConf

VERSION = 2  # of the page data: part of the pages stage key (2: language-specific needs 2x the rate elsewhere)
PAGE_PARAMS = ("multilingual", "specific", "contexts", "tokens", "min_density")


def pages_stage(root: str, sae: Stage, paragraph_keys: Mapping[str, str], pc: MultilingualConf.Pages,
                skip_first: bool) -> Stage:
    """Where each layer's page data lives (item `layer_LL`)."""
    params = {**{p: getattr(pc, p) for p in PAGE_PARAMS}, "skip_first": skip_first, "languages": list(paragraph_keys)}
    return Stage.of(root, "multilingual/pages", None, params, inputs=[sae.key, *paragraph_keys.values()],
                    version=VERSION)


@dataclass(frozen=True)
class PagesJob:
    """One layer's pages: its SAE (stage item), the measured paragraph stores (language -> URL), the settings."""

    stage: Stage
    sae_stage: Stage
    layer: int
    paragraphs: dict[str, str]
    multilingual: int
    specific: int
    contexts: int
    tokens: int
    min_density: float
    skip_first: bool

    @property
    def item(self) -> str:
        return f"layer_{self.layer:02d}"


def sae_codes(sae: SparseAutoencoder, acts: Activations, layer: int, skip_first: bool) -> TextCodes:
    """A stored resid layer as the SAE's dense codes (on the SAE's device)."""
    return store_codes(lambda x: sae.encode(x.to(sae.W_dec.device)), acts, layer, "resid", skip_first)


def sae_directions(sae: SparseAutoencoder) -> torch.Tensor:
    """Decoder rows as they add to the residual stream (the SAE's input scale folded in)."""
    return (sae.W_dec * sae.scale).detach()


def feature_pages(lm: LM, job: PagesJob) -> LayerPages:
    """Actor body: the layer's page data, found in the store or gathered and published there."""
    def compute() -> Item:
        sae = SparseAutoencoder.from_state(job.sae_stage.load(job.item).tensors).to(lm.device)
        sources = {lang: sae_codes(sae, Activations(url), job.layer, job.skip_first)
                   for lang, url in job.paragraphs.items()}
        pages = layer_pages(lm, sources, sae_directions(sae), job.layer, "sae", job.multilingual, job.specific,
                            job.contexts, job.tokens, job.min_density)
        return Item(meta=asdict(pages))

    item, _ = job.stage.get_or_compute(job.item, compute)
    return from_dict(item.meta)


def page_jobs(conf: Config, sae: Stage, paragraphs: Mapping[str, tuple[str, str]], layers: list[int]) -> list[PagesJob]:
    """One job per dictionary layer; `paragraphs`: language -> (store key, store URL) of the measured paragraphs."""
    mc = conf.multilingual
    pc = mc.pages
    stage = pages_stage(conf.store.root, sae, {lang: key for lang, (key, _) in paragraphs.items()}, pc, mc.skip_first)
    urls = {lang: url for lang, (_, url) in paragraphs.items()}
    return [PagesJob(stage, sae, l, urls, pc.multilingual, pc.specific, pc.contexts, pc.tokens, pc.min_density,
                     mc.skip_first) for l in layers]


def build_pages(conf: Config, jobs: list[PagesJob]) -> list[LayerPages]:
    """Every layer's page data: found ones read here; missing ones gathered by one model actor, started only then
    (the flow's own actors are gone once the dictionaries train)."""
    missing = [j for j in jobs if not j.stage.done(j.item)]
    if missing:
        with ModelPool(conf, size=1) as pool:
            pool.map(feature_pages, missing, desc="feature pages")
    return [from_dict(j.stage.load(j.item).meta) for j in jobs]
