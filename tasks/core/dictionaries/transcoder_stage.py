"""Per-layer transcoders for every block of a model, as one stage: keyed by the model's identity, the training texts
and every setting that changes a trained transcoder; one item `layer_XX` per block, published the moment that layer
has trained, so a killed run resumes with the layers it has. Layers train in parallel on the model actors (each
needs the model to read its (mlp_in, mlp_out) pairs); any experiment that reads the model through transcoders
(circuits, multilingual) uses this stage and finds the same items again.

Every item records the model it was trained on; `load_transcoders` refuses a stage of another model (by the model
fingerprint), in one line naming the folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from pydantic import Field

from lensflow.tasks.core.config import ConfigError, Section
from lensflow.tasks.core.dictionaries.transcoder import (
    Transcoder,
    evaluate_transcoder,
    mlp_pairs,
    spliced_loss,
    train_transcoder,
)
from lensflow.tasks.core.models import LM
from lensflow.tasks.core.stages import Item, ModelId, Stage, digest

VERSION = 1  # of the saved state and the training code: part of the stage key
NAME = "dictionaries/transcoders"


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


def transcoder_stage(root: str, model: ModelId, conf: TranscoderConf, texts: list[str]) -> Stage:
    return Stage.of(root, NAME, model, {**conf.params(), "texts": digest(texts), "n_texts": len(texts)},
                    version=VERSION)


@dataclass(frozen=True)
class TranscoderJob:
    """One block's transcoder: read pairs on the training texts, train, measure on the held-out texts, publish."""

    stage: Stage
    model: ModelId
    layer: int
    conf: dict  # TranscoderConf.model_dump()
    texts: tuple[str, ...]

    @property
    def item(self) -> str:
        return f"layer_{self.layer:02d}"


@dataclass(frozen=True)
class TrainedLayer:
    layer: int
    metrics: dict[str, float]  # fve, l0, dead, loss_clean, loss_spliced
    trained: bool  # by this call; False = found in the store


def _pairs(lm: LM, texts: list[str], layer: int, conf: TranscoderConf) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [mlp_pairs(lm, texts[i:i + conf.batch_texts], layer, conf.max_tokens)
             for i in range(0, len(texts), conf.batch_texts)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _train(lm: LM, job: TranscoderJob) -> Item:
    if lm.id != job.model:
        raise ConfigError(f"{job.stage.url}: planned for model {job.model.name} ({job.model.weights_hash}), but the "
                          f"actor holds {lm.id.name} ({lm.id.weights_hash})")
    conf = TranscoderConf(**job.conf)
    texts = list(job.texts)
    n_train = max(1, min(len(texts) - 1, round(len(texts) * (1 - conf.holdout))))
    torch.manual_seed(conf.seed + job.layer)
    x, y = _pairs(lm, texts[:n_train], job.layer, conf)
    tc = Transcoder(x.shape[1], y.shape[1], conf.width, conf.k, seed=conf.seed + job.layer).to(lm.device)
    with torch.enable_grad():
        losses = train_transcoder(tc, x, y, conf.steps, conf.batch_tokens, conf.lr, seed=conf.seed + job.layer)
    tc.requires_grad_(False)
    hx, hy = _pairs(lm, texts[n_train:], job.layer, conf)
    m = evaluate_transcoder(tc, hx, hy)
    spliced = spliced_loss(lm, tc, job.layer, texts[n_train:], conf.max_tokens)
    metrics = {"fve": m.fve, "l0": m.l0, "dead": m.dead, "loss_clean": spliced.clean, "loss_spliced": spliced.spliced,
               "train_tokens": float(x.shape[0])}
    return Item(tc.state(), {"metrics": metrics, "losses": losses[-50:], "model": asdict(job.model),
                             "layer": job.layer, "conf": job.conf})


def train_layer(lm: LM, job: TranscoderJob) -> TrainedLayer:
    """Actor side: the layer's transcoder from the store, or trained and published there."""
    item, computed = job.stage.get_or_compute(job.item, lambda: _train(lm, job))
    return TrainedLayer(job.layer, item.meta["metrics"], computed)


def train_transcoders(pool, stage: Stage, model: ModelId, conf: TranscoderConf, texts: list[str],
                      layers: list[int]) -> list[TrainedLayer]:
    """Every requested layer on the pool's actors in parallel (already published layers are only read)."""
    jobs = [TranscoderJob(stage, model, layer, conf.model_dump(), tuple(texts)) for layer in layers]
    return pool.map(train_layer, jobs, desc="transcoders", in_flight=1)


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
