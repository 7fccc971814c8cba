"""The multilingual experiment's decisions: its inputs, which layers, which pairs and baseline, the stores it
extracts and the per-layer SAE jobs. Plain functions, so the flow reads as an outline and each choice is tested
without Prefect or Ray."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lensflow.tasks.core.actors import map_remote
from lensflow.tasks.core.config import Config, ConfigError, with_overrides
from lensflow.tasks.core.devices import cluster_gpus
from lensflow.tasks.core.dictionaries import transcoder_stage as tc_stage
from lensflow.tasks.core.dictionaries.saelens import export_sae, import_sae
from lensflow.tasks.core.extraction import Extraction
from lensflow.tasks.core.models import ModelInfo
from lensflow.tasks.core.prompts import load_prompts
from lensflow.tasks.core.ray_cluster import connect
from lensflow.tasks.core.stages import Stage, is_remote
from lensflow.tasks.multilingual import features, transcoders
from lensflow.tasks.multilingual.config import MultilingualConf
from lensflow.tasks.multilingual.overlap import (
    OverlapJob,
    SAELayerResult,
    derangement,
    overlap_stage,
    parse_pairs,
    sae_layer,
)
from lensflow.tasks.multilingual.parallel import load_parallel
from lensflow.tasks.multilingual.sae import SAEJob, SparseAutoencoder, TrainSpec, sae_stage


@dataclass(frozen=True)
class MultilingualInputs:
    corpus: dict[str, list[str]]  # language -> the measured paragraphs, aligned by index
    pairs: list[tuple[str, str]]
    perm: np.ndarray  # unrelated baseline: paragraph i against paragraph perm[i] (a derangement)
    general: list[str]  # general text: SAE training (every token) and neuron calibration (the first prompts)
    sae_text: dict[str, list[str]]  # language -> the paragraphs that train the SAE beside `general`, never measured
    train_rows: list[int]  # their line indices in the parallel files (the same in every language)

    @property
    def n_paragraphs(self) -> int:
        return len(next(iter(self.corpus.values())))


def resolve_model(conf: Config) -> Config:
    """The run config with the section's model applied: `multilingual.model` when the run config names no
    model.name (pydantic's fields_set: a YAML key or --set, even one equal to the core default), else unchanged.
    So the flow's default is Gemma 3 while the model section, shared by every flow, keeps SmolLM2 as its default."""
    mc = conf.multilingual
    if mc.model is None or "name" in conf.model.model_fields_set:
        return conf
    return with_overrides(conf, {"model.name": mc.model})


def check_inputs(conf: Config) -> None:
    """Preflight (the CLI, before any model loads or output exists): the corpus, the pairs and the general text,
    read with the model this flow will run, so a bad file or language fails as one line with exit 2."""
    load_inputs(resolve_model(conf))


def load_inputs(conf: Config) -> MultilingualInputs:
    """Everything the run reads, loaded and checked before any store or run exists."""
    mc = conf.multilingual
    tt = mc.transcoders.train
    if mc.transcoders.enabled and tt.k > tt.width:
        raise ConfigError(f"config key 'multilingual.transcoders.train.k': {tt.k} exceeds the transcoder width "
                          f"{tt.width} (multilingual.transcoders.train.width)")
    full = load_parallel(mc.languages, mc.files, mc.max_paragraphs)
    pairs = parse_pairs(mc.languages, mc.pairs)
    general = load_prompts(with_overrides(conf, {"data.max_prompts": mc.sae.train_prompts}).data)
    train = split_paragraphs(len(full[mc.languages[0]]), mc.sae.train_paragraphs, mc.seed)
    corpus = {lang: [p for i, p in enumerate(paras) if i not in train] for lang, paras in full.items()}
    sae_text = {lang: [paras[i] for i in train] for lang, paras in full.items()} if train else {}
    return MultilingualInputs(corpus, pairs, derangement(len(corpus[mc.languages[0]]), mc.seed), general, sae_text,
                              train)


def split_paragraphs(n: int, n_train: int, seed: int) -> list[int]:
    """The SAE-training paragraphs: a seeded choice of `n_train` of the `n` line indices, the same in every
    language (sorted); the rest are measured, so every overlap and per-language FVE is on text the SAE never saw."""
    if n - n_train < 2:
        raise ConfigError(f"config key 'multilingual.sae.train_paragraphs': {n_train} of {n} parallel paragraphs "
                          "leaves fewer than 2 to measure")
    rng = np.random.default_rng([seed, 1])  # a stream of its own: the baseline's derangement draws from `seed`
    return sorted(int(i) for i in rng.choice(n, n_train, replace=False))


def choose_layers(mc: MultilingualConf, n_layers: int) -> list[int]:
    """Configured resid layers, or every `layer_stride`-th layer from 0 plus the last."""
    if mc.layers is not None:
        bad = [l for l in mc.layers if not 0 <= l <= n_layers]
        if bad:
            raise ConfigError(f"config key 'multilingual.layers': {bad} out of range 0..{n_layers}")
        return sorted(set(mc.layers))
    return sorted({*range(0, n_layers + 1, mc.layer_stride), n_layers})


def store_confs(conf: Config, layers: list[int]) -> tuple[Config, Config]:
    """(general text, paragraphs): every token of the chosen resid layers; paragraphs cut at paragraph_tokens."""
    general = with_overrides(conf, {"store.positions": "all", "store.layers": layers, "store.sites": ["resid"]})
    return general, with_overrides(general, {"data.max_tokens": conf.multilingual.paragraph_tokens})


def measured_conf(conf: Config, paragraph_conf: Config) -> Config:
    """The measured paragraphs' stores: with transcoders, also each chosen block's MLP input and output (blocks
    numbered like the layers: block l reads resid layer l), what the transcoders are measured on per language."""
    if not conf.multilingual.transcoders.enabled:
        return paragraph_conf
    return with_overrides(paragraph_conf, {"store.sites": ["resid", "mlp_in", "mlp_out"]})


def transcoder_blocks(layers: list[int], n_layers: int) -> list[int]:
    """The blocks whose transcoders are trained and measured: those numbered like a chosen resid layer."""
    return [l for l in layers if l < n_layers]


def transcoder_stage(conf: Config, info: ModelInfo, inputs: MultilingualInputs) -> Stage:
    """The core's per-block transcoder stage for this run's training texts (every language's training paragraphs,
    then the general text, which the stage's holdout takes from)."""
    texts = transcoders.training_texts(inputs.sae_text, inputs.general)
    return tc_stage.transcoder_stage(conf.store.root, info.id, conf.multilingual.transcoders.train, texts)


def train_transcoders(conf: Config, pool, info: ModelInfo, inputs: MultilingualInputs,
                      blocks: list[int]) -> list[tc_stage.TrainedLayer]:
    """Every chosen block's transcoder on the model actors (found ones only read); none when disabled."""
    mt = conf.multilingual.transcoders
    if not mt.enabled or not blocks:
        return []
    texts = transcoders.training_texts(inputs.sae_text, inputs.general)
    return tc_stage.train_transcoders(pool, transcoder_stage(conf, info, inputs), info.id, mt.train, texts, blocks)


def transcoder_jobs(conf: Config, info: ModelInfo, inputs: MultilingualInputs, paragraphs: dict[str, Extraction],
                    blocks: list[int]) -> list[transcoders.TranscoderOverlapJob]:
    """One model-free job per block: its transcoder measured on each language's stored measured paragraphs."""
    mc = conf.multilingual
    if not mc.transcoders.enabled or not blocks:
        return []
    trained = transcoder_stage(conf, info, inputs)
    stage = transcoders.overlap_stage(conf.store.root, trained, {l: ex.key for l, ex in paragraphs.items()},
                                      inputs.pairs, mc.seed)
    urls = {l: ex.url for l, ex in paragraphs.items()}
    return [transcoders.TranscoderOverlapJob(trained, stage, b, urls, inputs.pairs, inputs.perm.tolist(),
                                             mc.skip_first) for b in blocks]


def transcoder_layers(conf: Config, jobs: list[transcoders.TranscoderOverlapJob]) -> list[
        transcoders.TranscoderLayerResult]:
    """One Ray remote call per block (the model actors are gone by then); light: reads and encodes, no training."""
    if not jobs:
        return []
    connect(conf.ray)
    return map_remote(transcoders.transcoder_layer, jobs, "transcoder per block", conf.ray)


def sae_jobs(conf: Config, info: ModelInfo, general: Extraction, sae_text: dict[str, Extraction],
             paragraphs: dict[str, Extraction], layers: list[int], inputs: MultilingualInputs) -> list[OverlapJob]:
    """One job per resid layer: its SAE item keyed by the general store, each language's training-paragraph store
    and the SAE settings; its overlap item keyed by that SAE stage, the measured paragraph stores, the pairs and
    the baseline's seed."""
    mc, sc = conf.multilingual, conf.multilingual.sae
    if sc.activation == "topk" and sc.k > sc.expansion * info.d_model:
        raise ConfigError(f"config key 'multilingual.sae.k': {sc.k} exceeds the SAE width {sc.expansion * info.d_model} "
                          f"(multilingual.sae.expansion {sc.expansion} x d_model {info.d_model})")
    train_keys = {lang: ex.key for lang, ex in sae_text.items()}
    saes = sae_stage(conf.store.root, general.key, sc, mc.skip_first, mc.seed, train_keys)
    overlaps = overlap_stage(conf.store.root, saes, {l: ex.key for l, ex in paragraphs.items()}, inputs.pairs, mc.seed)
    spec = TrainSpec(steps=sc.steps, batch_tokens=sc.batch_tokens, lr=sc.lr, l1=sc.l1, seed=mc.seed)
    urls, train_urls = {l: ex.url for l, ex in paragraphs.items()}, {l: ex.url for l, ex in sae_text.items()}
    if sc.pretrained is not None:
        check_pretrained(sc.pretrained, layers, info.d_model)
    return [OverlapJob(SAEJob(saes, general.url, l, sc.expansion * info.d_model, sc.activation, sc.k, spec, sc.holdout,
                              mc.skip_first, train_urls, sc.general_share, sc.pretrained), overlaps, urls,
                       inputs.pairs, inputs.perm.tolist()) for l in layers]


def check_pretrained(folder: str, layers: list[int], d_model: int) -> None:
    """Every chosen layer's SAELens folder reads and fits the model (one line naming the folder otherwise)."""
    for l in layers:
        sae = import_sae(f"{folder}/layer_{l:02d}")
        if sae.W_dec.shape[1] != d_model:
            raise ConfigError(f"config key 'multilingual.sae.pretrained': {folder}/layer_{l:02d} has d_in "
                              f"{sae.W_dec.shape[1]}, the model's width is {d_model}")


def hook_name(layer: int, n_layers: int) -> str:
    """TransformerLens's name of resid layer `layer` (SAELens cfg.json `hook_name`)."""
    return f"blocks.{layer}.hook_resid_pre" if layer < n_layers else f"blocks.{n_layers - 1}.hook_resid_post"


def export_saelens(results: list[SAELayerResult], info: ModelInfo) -> dict[int, str]:
    """Every layer's SAE also as a SAELens folder `{store root}/saelens/{sae stage name}/{key}/layer_LL`, written
    once (a rerun finds it; a resumed run writes what a killed one had not), so other tools load the SAEs. Local
    stores only: an object store keeps the stage items. Returns layer -> folder."""
    out = {}
    for r in results:
        st = r.sae_stage
        if is_remote(st.root):
            continue
        folder = Path(st.root.removeprefix("file://"), "saelens", st.name, st.key, f"layer_{r.layer:02d}")
        if not ((folder / "cfg.json").is_file() and (folder / "sae_weights.safetensors").is_file()):
            item = st.load(f"layer_{r.layer:02d}")
            export_sae(SparseAutoencoder.from_state(item.tensors), folder, hook_name(r.layer, info.n_layers),
                       info.name, r.layer)
        out[r.layer] = str(folder)
    return out


def sae_layers(conf: Config, jobs: list[OverlapJob]) -> list[SAELayerResult]:
    """One Ray remote call per layer, a whole GPU each where the cluster has GPUs (the model actors are gone by
    then): a paper-scale SAE is 6.4 GB with Adam and compute-bound, unlike the light lens and probe tasks."""
    connect(conf.ray)
    gpus = 1.0 if cluster_gpus() >= 1 else 0.0
    return map_remote(sae_layer, jobs, "SAE per layer", conf.ray, num_gpus=gpus)


def page_jobs(conf: Config, results: list[SAELayerResult], paragraphs: dict[str, Extraction]) -> list[features.PagesJob]:
    """Feature pages of every SAE layer, read on the measured paragraphs; none when multilingual.pages.enabled is
    off."""
    if not conf.multilingual.pages.enabled or not results:
        return []
    return features.page_jobs(conf, results[0].sae_stage, {l: (ex.key, ex.url) for l, ex in paragraphs.items()},
                              [r.layer for r in results])
