"""Shared multilingual features (Anthropic, "On the Biology of a Large Language Model", 2025): do translations of a
paragraph light up the same dictionary features, and where in depth?"""

from lensflow.tasks.core.experiment import Experiment, Headline
from lensflow.tasks.multilingual.config import MultilingualConf


def _check_inputs(conf) -> None:  # imported late: plan imports the core's actors and stores
    from lensflow.tasks.multilingual.plan import check_inputs

    check_inputs(conf)


def _resolve(conf):
    from lensflow.tasks.multilingual.plan import resolve_model

    return resolve_model(conf)


EXPERIMENT = Experiment(
    name="multilingual",
    flow="lensflow.flows.multilingual:multilingual_flow",
    headline=Headline("multilingual.overlap.gap", "max", "best"),
    check_inputs=_check_inputs,  # the parallel corpus and the general text
    resolve=_resolve,  # multilingual.model (Gemma 3) unless model.name is set: preflight checks its depth
    section="multilingual",
    config=MultilingualConf,
    # headline: the translated-unrelated gap (SAE features and neurons), translated overlap per pair, SAE FVE, per
    # layer; unrelated overlaps and standard errors: multilingual.pairs; SAE training: multilingual.training
    metric_sections=(("multilingual.training.", "multilingual.training"),
                     ("multilingual.sae.fve.", "multilingual.sae"), ("multilingual.sae.fve", "multilingual"),
                     ("multilingual.sae.", "multilingual.sae"),
                     ("multilingual.neurons.overlap.gap_se", "multilingual.neurons"),
                     ("multilingual.neurons.overlap.gap", "multilingual"),
                     ("multilingual.neurons.", "multilingual.neurons"),
                     ("multilingual.overlap.size.", "multilingual.sizes"),
                     ("multilingual.overlap.gap_se", "multilingual.pairs"),
                     ("multilingual.overlap.unrelated.", "multilingual.pairs"),
                     ("multilingual.overlap.", "multilingual"),
                     ("multilingual.transcoder.", "multilingual.transcoder"), ("multilingual.", "multilingual.details")),
)
