"""The transcoders a circuits run reads: the core's per-layer transcoder stage, trained on the circuits texts, or a
stage folder the user names (circuits.transcoders), checked against the model by fingerprint."""

from __future__ import annotations

from dataclasses import dataclass

from lensflow.tasks.circuits.texts import training_texts
from lensflow.tasks.core.config import Config
from lensflow.tasks.core.dictionaries.transcoder_stage import (
    TrainedLayer,
    load_transcoders,
    train_transcoders,
    transcoder_stage,
)
from lensflow.tasks.core.models import ModelInfo


@dataclass(frozen=True)
class Dictionaries:
    url: str  # the stage folder every graph and intervention reads
    layers: list[TrainedLayer]  # empty when the user named the folder

    @property
    def computed(self) -> int:
        return sum(t.trained for t in self.layers)


def prepare_transcoders(conf: Config, pool, info: ModelInfo) -> Dictionaries:
    """Every block's transcoder, trained in parallel on the model actors unless already published (or named)."""
    cc = conf.circuits
    if cc.transcoders is not None:
        load_transcoders(cc.transcoders, info.id, info.n_layers, "circuits.transcoders")  # refused here, not later
        return Dictionaries(cc.transcoders, [])
    texts = training_texts(cc.languages, cc.texts_per_language)
    stage = transcoder_stage(conf.store.root, info.id, cc.transcoder, texts)
    trained = train_transcoders(pool, stage, info.id, cc.transcoder, texts, list(range(info.n_layers)))
    return Dictionaries(stage.url, trained)
