"""The logit lens (nostalgebraist 2020) and the tuned lens (Belrose et al. 2023): each layer read as a prediction."""

from lensflow.tasks.core.experiment import Experiment, Headline
from lensflow.tasks.core.prompts import check_prompts
from lensflow.tasks.lenses.config import LensesConf

EXPERIMENT = Experiment(
    name="logit-lens",
    flow="lensflow.flows.logit_lens:logit_lens_flow",
    headline=Headline("tuned_lens.kl_to_final", "min", "mean"),  # KL to the final layer is 0 at the last layer
    check_inputs=check_prompts,
    section="lenses",
    config=LensesConf,
    # lenses.*: per-layer wall and CPU seconds and translator bookkeeping; headline: KL and top-1 agreement per layer of
    # both lenses (means: lenses.details); translator training: lenses.training
    metric_sections=(("lenses.", "run"), ("tuned_lens.training.", "lenses.training"),
                     ("tuned_lens.better_layers", "lenses.details"), ("logit_lens.", "lenses"),
                     ("tuned_lens.", "lenses")),
    lens_grids={kind: "lensflow.tasks.lenses.report:render_grid" for kind in ("logit", "tuned")},
)
