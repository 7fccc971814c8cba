"""Circuits (Ameisen et al. / Lindsey et al. 2025, "On the Biology of a Large Language Model"): attribution graphs
of prompts from per-layer transcoders, and feature-space interventions that test what a graph shows (switch the
answer's language, swap the operand, swap the operation) on the five-language antonym set."""

from lensflow.tasks.circuits.config import CircuitsConf
from lensflow.tasks.core.config import Config, with_overrides
from lensflow.tasks.core.experiment import Experiment, Headline


def resolve_model(conf: Config) -> Config:
    """circuits.model (Gemma 3, which answers the antonym prompts in five languages) unless model.name is set."""
    cc = conf.circuits
    if cc.model is None or "name" in conf.model.model_fields_set:
        return conf
    return with_overrides(conf, {"model.name": cc.model})


def _check_inputs(conf: Config) -> None:
    from lensflow.tasks.circuits.checks import check_inputs

    check_inputs(resolve_model(conf))


EXPERIMENT = Experiment(
    name="circuits",
    flow="lensflow.flows.circuits:circuits_flow",
    headline=Headline("circuits.language.success", "max", "best"),
    check_inputs=_check_inputs,
    resolve=resolve_model,
    section="circuits",
    config=CircuitsConf,
    metric_sections=(("circuits.graph.", "circuits.graphs"), ("circuits.transcoder.", "circuits.transcoders"),
                     ("circuits.control.", "circuits.controls"), ("circuits.", "circuits")),
    feature_pages="transcoders",  # transcoder pages (tasks/circuits/feature_pages.py); SAE pages are under features/
)
