"""Feature pages of the transcoder features a graph shows, and the supernodes proposed from them.

Transcoder pages live in their own artifact folder, `transcoders/layer_LL/feature_NNNNN.html` (ROOT), so they never
collide with an SAE's `features/...` pages in a run that has both: an SAE's feature 42 at layer 5 and a transcoder's
are different features. The pages are built only for the features whose incoming edges a graph computed (every
feature a pruned graph can keep), from each language's texts (the antonym and synonym prompts, then the parallel
paragraphs), so the language profile and the top tokens that tasks.circuits.proposed groups by are the features'
own on these languages. A stage: keyed by the transcoders, the texts and the features, found again on a rerun.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from lensflow.tasks.circuits.attribution import Graph
from lensflow.tasks.circuits.graph_json import PAGES_ROOT
from lensflow.tasks.circuits.graphs import actor_transcoders
from lensflow.tasks.circuits.proposed import operand_words, propose
from lensflow.tasks.circuits.supernodes import Supernodes
from lensflow.tasks.circuits.texts import parallel_paragraphs
from lensflow.tasks.core.dictionaries.pages import FeaturePage as Page
from lensflow.tasks.core.dictionaries.pages import (
    LayerPages,
    TextCodes,
    choose_features,
    contexts,
    feature_stats,
    from_dict,
    output_tokens,
    token_strings,
)
from lensflow.tasks.core.dictionaries.transcoder import Transcoder
from lensflow.tasks.core.hooks import Read, trace
from lensflow.tasks.core.models import LM
from lensflow.tasks.core.stages import Item, Stage
from lensflow.tasks.data.antonym_set import load_antonyms, prompt, synonym_prompt

ROOT = PAGES_ROOT  # the artifact folder of transcoder feature pages (SAE pages are under features/)
VERSION = 1
CONTEXTS = 8  # top contexts per page
TOKENS = 8  # promoted and suppressed output tokens per page
MAX_TOKENS = 32  # each text truncated to this many tokens


def page_texts(languages: list[str], per_language: int) -> dict[str, list[str]]:
    """Per language: the antonym and synonym prompts of the shipped set, then its parallel paragraphs."""
    pairs = load_antonyms(languages)
    return {lang: [f(lang, p.entries[lang].word) for p in pairs for f in (prompt, synonym_prompt)]
            + parallel_paragraphs(lang, per_language) for lang in languages}


def computed_features(graphs: list[Graph]) -> dict[int, list[int]]:
    """{layer: feature ids}: the features whose incoming edges some graph computed (a pruned graph keeps no other)."""
    out: dict[int, set[int]] = {}
    for g in graphs:
        done = g.rows_computed[:g.n_features]
        for l, _, f in g.features[done].tolist():
            out.setdefault(l, set()).add(f)
    return {l: sorted(fs) for l, fs in sorted(out.items())}


def _codes(lm: LM, texts: list[str], layers: list[int], tcs: dict[int, Transcoder],
           batch: int = 16) -> tuple[np.ndarray, dict[int, torch.Tensor]]:
    """Token ids [n, T] (-1 = padding) and per layer the transcoder's codes [n, T, width] on the MLP input."""
    enc = lm.encode(texts, max_tokens=MAX_TOKENS)
    ids = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -1).cpu().numpy()
    out: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    for i in range(0, len(texts), batch):
        sl = slice(i, i + batch)
        with torch.no_grad(), trace(lm, reads=[Read("mlp_in", l) for l in layers]) as t:
            t.forward(input_ids=enc["input_ids"][sl], attention_mask=enc["attention_mask"][sl], until=max(layers) + 1)
        for l in layers:
            out[l].append(tcs[l].encode(t["mlp_in", l].float()).cpu())
    return ids, {l: torch.cat(z) for l, z in out.items()}


def transcoder_pages(lm: LM, tcs: dict[int, Transcoder], texts: dict[str, list[str]],
                     features: dict[int, list[int]]) -> list[LayerPages]:
    """The pages of the given features (kind: the feature-page index's own rule, `multilingual`, `specific:<lang>`,
    or `graph` for neither)."""
    layers = sorted(features)
    if not layers:
        return []
    read = {lang: _codes(lm, t, layers, tcs) for lang, t in texts.items()}
    out = []
    for l in layers:
        sources = {lang: TextCodes(ids, lambda rows, z=z[l]: z[torch.as_tensor(rows)]) for lang, (ids, z) in read.items()}
        stats = feature_stats(sources, CONTEXTS, desc=f"transcoder pages layer {l}")
        kinds = choose_features(stats, stats.width, stats.width) if len(stats.sources) > 1 else {}
        feats = features[l]
        ctx = contexts(sources, stats, feats, lm.tokenizer)
        ids, vals = output_tokens(lm, tcs[l].decoder_vectors().detach()[feats], TOKENS)
        density = stats.density()
        pages = []
        for i, f in enumerate(feats):
            pairs = [(t, float(v)) for t, v in zip(token_strings(lm.tokenizer, ids[i].tolist()), vals[i].tolist())]
            pages.append(Page(l, f, kinds.get(f, "graph"), float(density[f]), stats.profile(f), ctx[f],
                              pairs[:TOKENS], pairs[TOKENS:]))
        out.append(LayerPages(l, "transcoder", stats.width, float((stats.fired.sum(0) == 0).mean()), pages))
    return out


def pages_stage(root: str, transcoders_url: str, texts: dict[str, list[str]], features: dict[int, list[int]]) -> Stage:
    return Stage.of(root, "circuits/transcoder_pages", None, {"texts": texts, "features": features,
                                                             "contexts": CONTEXTS, "tokens": TOKENS,
                                                             "max_tokens": MAX_TOKENS},
                    inputs=[transcoders_url], version=VERSION)


@dataclass(frozen=True)
class PagesJob:
    stage: Stage
    transcoders: str
    texts: dict[str, list[str]]
    features: dict[int, list[int]]


def pages_of(lm: LM, job: PagesJob) -> tuple[list[LayerPages], bool]:
    """Actor side: (the pages, whether this call computed them)."""
    def compute() -> Item:
        pages = transcoder_pages(lm, actor_transcoders(lm, job.transcoders), job.texts, job.features)
        return Item({}, {"layers": [asdict(lp) for lp in pages]})

    item, computed = job.stage.get_or_compute("pages", compute)
    return [from_dict(d) for d in item.meta["layers"]], computed


def graph_pages(pool, root: str, transcoders: str, graphs: list[Graph], languages: list[str],
                per_language: int) -> tuple[list[LayerPages], bool]:
    """The pages of every feature the graphs computed rows for, on one model actor (or found in the store)."""
    texts, features = page_texts(languages, per_language), computed_features(graphs)
    job = PagesJob(pages_stage(root, transcoders, texts, features), transcoders, texts, features)
    ((pages, computed),) = pool.map(pages_of, [job], desc="transcoder feature pages", in_flight=1)
    return pages, computed


def proposed_supernodes(pages: list[LayerPages], g: Graph, languages: list[str]) -> Supernodes:
    """One graph's proposed groups: language profile, and operand words of every antonym pair in the set."""
    active = {(int(l), int(f)) for l, _, f in g.features[g.rows_computed[:g.n_features]].tolist()}
    return propose(pages, active, operand_words(load_antonyms(languages), languages))


def only(pages: list[LayerPages], wanted: set[tuple[int, int]]) -> list[LayerPages]:
    """The pages of these (layer, feature) pairs (one graph's share of the site)."""
    return [LayerPages(lp.layer, lp.dictionary, lp.width, lp.dead, [p for p in lp.pages if (p.layer, p.feature) in wanted])
            for lp in pages]
