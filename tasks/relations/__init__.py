"""Linear relational embeddings (Hernandez et al., ICLR 2024): is a relation's decoding one affine map of the
subject's state, and does inverting it edit the answer?"""

from lensflow.tasks.core.config import Config, ConfigError
from lensflow.tasks.core.experiment import Experiment, Headline
from lensflow.tasks.relations.config import LreConf


def _check_inputs(conf: Config) -> None:
    """Relation files and layer keys, before Prefect or Ray start (one line naming the file or key)."""
    from lensflow.tasks.core.models import check_mappable
    from lensflow.tasks.relations.data import load_relations, select_relations, split

    lc = conf.lre
    rels = select_relations(load_relations(lc.relations), lc.only, lc.max_relations)
    n_layers = check_mappable(conf.model)
    bad = [l for l in lc.layer_list(n_layers) if not 0 <= l < n_layers]  # the subject state must have blocks after it
    if bad:
        raise ConfigError(f"config key 'lre.layers': {bad} out of range 0..{n_layers - 1} for {conf.model.name}")
    for r in rels:
        split(r, lc.n_train, lc.n_dev, lc.max_test, lc.seed)


EXPERIMENT = Experiment(
    name="lre",
    flow="lensflow.flows.lre:lre_flow",
    headline=Headline("lre.faithfulness.lre", "max", "best"),
    check_inputs=_check_inputs,
    section="lre",
    config=LreConf,
    # headline: the mean faithfulness and causality per layer (7 curves); per-relation curves and every single value
    # (means, kinds, the fitted settings) below it
    metric_sections=(("lre.layer.", "lre"), ("lre.relation.", "lre.relations"), ("lre.", "lre.details")),
)
