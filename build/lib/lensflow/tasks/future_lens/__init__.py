"""Future Lens (Pal et al., CoNLL 2023): how much a single hidden state tells about the tokens after the next."""

from lensflow.tasks.core.experiment import Experiment, Headline
from lensflow.tasks.core.prompts import check_prompts
from lensflow.tasks.future_lens.config import FutureLensConf

EXPERIMENT = Experiment(
    name="future-lens",
    flow="lensflow.flows.future_lens:future_lens_flow",
    headline=Headline("future_lens.soft_prompt.p_at_1.n1", "max", "best"),
    check_inputs=check_prompts,
    section="future_lens",
    config=FutureLensConf,
    metric_sections=(("future_lens.time.", "run"), ("future_lens.computed.", "run")),
    lens_grids={"future": "lensflow.tasks.future_lens.grid:render_grid"},
)
