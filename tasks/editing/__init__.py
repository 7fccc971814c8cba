"""Fact editing: ROME (Meng et al. 2022) and MEMIT (Meng et al. 2023) on CounterFact-style requests."""

from lensflow.tasks.core.config import Config, ConfigError
from lensflow.tasks.core.experiment import Experiment, Headline
from lensflow.tasks.editing.config import EditConf


def _check_inputs(conf: Config) -> None:
    """The request file and the layer keys (block indices), before Prefect or Ray start."""
    from lensflow.tasks.core.models import check_mappable
    from lensflow.tasks.editing.requests import load_requests

    requests = load_requests(conf.edit.requests)
    n_layers = check_mappable(conf.model)
    ec = conf.edit
    for key, layers in (("edit.layer", [ec.rome_layer(n_layers)]), ("edit.memit_layers", ec.memit_layer_list(n_layers))):
        bad = [l for l in layers if not 0 <= l < n_layers]
        if bad:
            raise ConfigError(f"config key '{key}': {bad} out of range 0..{n_layers - 1} (MLP blocks of "
                              f"{conf.model.name})")
    if max(ec.memit_sizes) > len(requests):
        raise ConfigError(f"config key 'edit.memit_sizes': {max(ec.memit_sizes)} edits asked, the request file has "
                          f"{len(requests)}")


EXPERIMENT = Experiment(
    name="edit",
    flow="lensflow.flows.edit:edit_flow",
    headline=Headline("edit.rome.efficacy", "max", "best"),
    check_inputs=_check_inputs,
    section="edit",
    config=EditConf,
    # headline: the edited model's four scores for ROME and MEMIT; the unedited model's and the layer below them
    metric_sections=(("edit.rome.unedited.", "edit.details"), ("edit.memit.unedited.", "edit.details"),
                     ("edit.rome.layer", "edit.details")),
)
