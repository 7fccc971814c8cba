"""Shared multilingual features (Anthropic, "On the Biology of a Large Language Model", 2025): do translations of a
paragraph light up the same dictionary features, and where in depth?"""

from lensflow.tasks.core.experiment import Experiment, Headline
from lensflow.tasks.core.prompts import check_prompts
from lensflow.tasks.multilingual.config import MultilingualConf

EXPERIMENT = Experiment(
    name="multilingual",
    flow="lensflow.flows.multilingual:multilingual_flow",
    headline=Headline("multilingual.overlap.gap", "max", "best"),
    check_inputs=check_prompts,
    section="multilingual",
    config=MultilingualConf,
    metric_sections=(("multilingual.sae.", "multilingual.sae"), ("multilingual.neurons.", "multilingual.neurons"),
                     ("multilingual.overlap.size.", "multilingual.sizes")),
)
