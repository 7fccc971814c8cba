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
    # headline: Precision@1 per source layer of the learned prompt at every N, and of every other method at N=1
    # (the paper's figure); other metrics and N: future_lens.details; per-layer training: future_lens.training
    metric_sections=(("future_lens.time.", "run"), ("future_lens.computed.", "run"),
                     ("future_lens.training.", "future_lens.training"),
                     ("future_lens.soft_prompt.p_at_1.", "future_lens"),
                     *((f"future_lens.{m}.p_at_1.n1", "future_lens")
                       for m in ("ngram", "linear_vocab", "linear_hidden", "fixed_prompt")),
                     ("future_lens.", "future_lens.details")),
    lens_grids={"future": "lensflow.tasks.future_lens.grid:render_grid"},
)
