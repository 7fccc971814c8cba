"""Per-layer transcoders for every block of a model, as one stage: keyed by the model's identity, the training texts
and every setting that changes a trained transcoder; one item `layer_XX` per block, published the moment that layer
has trained, so a killed run resumes with the layers it has. The blocks are split into one group per model actor,
trained in parallel: an actor reads the (mlp_in, mlp_out) pairs of all its unpublished layers in one forward pass
over the texts (stopped after its deepest layer), then trains them one after the other. Any experiment that reads the
model through transcoders (circuits, multilingual) uses this stage and finds the same items again.

Every item records the model it was trained on; `load_transcoders` refuses a stage of another model (by the model
fingerprint), in one line naming the folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from lensflow.tasks.core.config import ConfigError
from lensflow.tasks.core.dictionaries.config import TranscoderConf
from lensflow.tasks.core.dictionaries.transcoder import (
    Transcoder,
    evaluate_transcoder,
    spliced_loss,
    train_transcoder,
)
from lensflow.tasks.core.hooks import Read, trace
from lensflow.tasks.core.models import LM
from lensflow.tasks.core.stages import Item, ModelId, Stage, digest

VERSION = 1  # of the saved state and the training code: part of the stage key
NAME = "dictionaries/transcoders"


def transcoder_stage(root: str, model: ModelId, conf: TranscoderConf, texts: list[str]) -> Stage:
    return Stage.of(root, NAME, model, {**conf.params(), "texts": digest(texts), "n_texts": len(texts)},
                    version=VERSION)


@dataclass(frozen=True)
class TranscoderJob:
    """A group of blocks' transcoders: read their pairs in one pass, train each, measure it on the held-out texts,
    publish it as item `layer_XX`."""

    stage: Stage
    model: ModelId
    layers: tuple[int, ...]
    conf: dict  # TranscoderConf.model_dump()
    texts: tuple[str, ...]


def item_name(layer: int) -> str:
    return f"layer_{layer:02d}"


@dataclass(frozen=True)
class TrainedLayer:
    layer: int
    metrics: dict[str, float]  # fve, l0, dead, loss_clean, loss_spliced, train_tokens
    trained: bool  # by this call; False = found in the store


SPLICE_TEXTS = 16  # held-out texts of the spliced-in loss (two full passes with logits each)


def pairs_of(lm: LM, texts: list[str], layers: list[int], conf: TranscoderConf) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (mlp_in, mlp_out) [tokens, d]} of real tokens (first dropped), every layer read in the same passes."""
    reads = [Read(site, l) for l in layers for site in ("mlp_in", "mlp_out")]
    parts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {l: [] for l in layers}
    for i in range(0, len(texts), conf.batch_texts):
        enc = lm.encode(texts[i:i + conf.batch_texts], max_tokens=conf.max_tokens)
        with torch.no_grad(), trace(lm, reads=reads) as t:
            t.forward(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], until=max(layers) + 1)
        mask = enc["attention_mask"].bool()
        mask[:, 0] = False
        for l in layers:
            parts[l].append((t["mlp_in", l][mask].float(), t["mlp_out", l][mask].float()))
    return {l: (torch.cat([a for a, _ in ps]), torch.cat([b for _, b in ps])) for l, ps in parts.items()}


def _train(lm: LM, job: TranscoderJob, layer: int, x: torch.Tensor, y: torch.Tensor,
           held: tuple[torch.Tensor, torch.Tensor], held_texts: list[str]) -> Item:
    conf = TranscoderConf(**job.conf)
    torch.manual_seed(conf.seed + layer)
    tc = Transcoder(x.shape[1], y.shape[1], conf.width, conf.k, seed=conf.seed + layer).to(lm.device)
    with torch.enable_grad():
        losses = train_transcoder(tc, x, y, conf.steps, conf.batch_tokens, conf.lr, seed=conf.seed + layer)
    tc.requires_grad_(False)
    m = evaluate_transcoder(tc, *held)
    spliced = spliced_loss(lm, tc, layer, held_texts[:SPLICE_TEXTS], conf.max_tokens)
    metrics = {"fve": m.fve, "l0": m.l0, "dead": m.dead, "loss_clean": spliced.clean, "loss_spliced": spliced.spliced,
               "train_tokens": float(x.shape[0])}
    return Item(tc.state(), {"metrics": metrics, "losses": losses[-50:], "model": asdict(job.model),
                             "layer": layer, "conf": job.conf})


def train_group(lm: LM, job: TranscoderJob) -> list[TrainedLayer]:
    """Actor side: the group's published layers are read; the others are trained from one read of their pairs and
    published one by one (a second run waiting on the same layer finds it when its claim comes)."""
    if lm.id != job.model:
        raise ConfigError(f"{job.stage.url}: planned for model {job.model.name} ({job.model.weights_hash}), but the "
                          f"actor holds {lm.id.name} ({lm.id.weights_hash})")
    conf = TranscoderConf(**job.conf)
    texts = list(job.texts)
    n_train = max(1, min(len(texts) - 1, round(len(texts) * (1 - conf.holdout))))
    todo = [l for l in job.layers if not job.stage.done(item_name(l))]
    train_pairs = pairs_of(lm, texts[:n_train], todo, conf) if todo else {}
    held_pairs = pairs_of(lm, texts[n_train:], todo, conf) if todo else {}
    out = []
    for layer in job.layers:
        item, computed = job.stage.get_or_compute(
            item_name(layer), lambda layer=layer: _train(lm, job, layer, *train_pairs[layer], held_pairs[layer],
                                                         texts[n_train:]))
        out.append(TrainedLayer(layer, item.meta["metrics"], computed))
        train_pairs.pop(layer, None)
    return out


def train_transcoders(pool, stage: Stage, model: ModelId, conf: TranscoderConf, texts: list[str],
                      layers: list[int]) -> list[TrainedLayer]:
    """Every requested layer, one contiguous group per model actor, in parallel (published layers are only read)."""
    groups = _groups(layers, pool.size)
    jobs = [TranscoderJob(stage, model, tuple(g), conf.model_dump(), tuple(texts)) for g in groups]
    done = pool.map(train_group, jobs, desc="transcoders", in_flight=1)
    return sorted((t for group in done for t in group), key=lambda t: t.layer)


def _groups(layers: list[int], n: int) -> list[list[int]]:
    """n contiguous groups of about equal size."""
    layers = sorted(layers)
    n = max(1, min(n, len(layers)))
    groups: list[list[int]] = [[] for _ in range(n)]
    per = len(layers) / n
    for i, l in enumerate(layers):
        groups[min(n - 1, int(i / per))].append(l)
    return [g for g in groups if g]


def load_transcoders(stage_url: str, model: ModelId, n_layers: int, field: str = "transcoders") -> dict[int, Transcoder]:
    """Every layer's transcoder of a stage folder (a path or URL); one line naming the folder when a layer is missing
    or the folder holds another model's dictionaries."""
    parent, _, key = stage_url.rstrip("/").rpartition("/")
    root, _, name = parent.rpartition("/")
    stage = Stage(root, name, key)  # the same folder, whatever stage name it was published under
    out = {}
    for layer in range(n_layers):
        item = stage.load(f"layer_{layer:02d}")
        if item is None:
            raise ConfigError(f"{field}: {stage_url} has no transcoder for layer {layer} (item layer_{layer:02d})")
        trained_on = ModelId(**item.meta["model"])
        if trained_on != model:
            raise ConfigError(f"{field}: {stage_url} holds transcoders of model {trained_on.name} "
                              f"(weights {trained_on.weights_hash}, tokenizer {trained_on.tokenizer_hash}), not of "
                              f"{model.name} (weights {model.weights_hash}, tokenizer {model.tokenizer_hash})")
        out[layer] = Transcoder.from_state(item.tensors)
    return out
