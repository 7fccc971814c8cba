"""Input checks of the circuits flow and of `lensflow attribute`, before Prefect, Ray or MLflow start: the antonym
set in the chosen languages, a named transcoder folder (its model, by fingerprint, when the model is converted
already), the supernode file, and that every prompt tokenises into the positions a graph needs."""

from __future__ import annotations

from lensflow.tasks.circuits.attribution import MIN_POSITIONS, check_budget, max_nodes, row_bound
from lensflow.tasks.core.config import Config, ConfigError, ModelConf
from lensflow.tasks.core.dictionaries.transcoder_stage import load_transcoders
from lensflow.tasks.core.models import (
    EMBEDDED,
    TINY_PREFIX,
    check_mappable,
    embedded_dir,
    load_model,
    tiny_tokenizer,
    tokenizer_hash,
)
from lensflow.tasks.core.stages import ModelId, Stage
from lensflow.tasks.data.antonym_set import load_antonyms


def driver_tokenizer(conf: ModelConf):
    """The model's tokenizer without its weights (a tiny model's built in memory; the embedded one converted once)."""
    from transformers import AutoTokenizer

    if conf.name.startswith(TINY_PREFIX):
        return tiny_tokenizer()
    path = str(embedded_dir(conf.name)) if conf.name in EMBEDDED else conf.name
    return AutoTokenizer.from_pretrained(path, revision=None if conf.name in EMBEDDED else conf.revision,
                                         trust_remote_code=conf.trust_remote_code)


def check_prompts(conf: Config, prompts: list[str], n_layers: int | None = None, k: int | None = None) -> None:
    """Every prompt tokenises into the positions a graph needs and (given n_layers and the transcoders' k) its graph,
    at its largest (rows computed x nodes), fits circuits.max_graph_mb."""
    cc = conf.circuits
    tok = driver_tokenizer(conf.model)
    for p in prompts:
        n = len(tok(p).input_ids)
        if n < MIN_POSITIONS:
            raise ConfigError(f"prompt {p!r}: {n} token(s) for {conf.model.name}; a graph needs at least "
                              f"{MIN_POSITIONS} positions (a token to attribute from and the one predicting next)")
        if n_layers is not None and k is not None:
            most = max_nodes(n_layers, n, k, cc.max_logits)
            rows = row_bound(most - n_layers * n - n - cc.max_logits, cc.max_feature_rows, cc.max_logits)
            check_budget(p, n, most, rows, cc.max_graph_mb, exact=False)


def driver_model_id(conf: ModelConf) -> ModelId | None:
    """The model's identity where the driver can tell it without loading the weights on an actor (tiny models are
    built, the embedded one's hash is cached beside its conversion); None for hub models (their actors check)."""
    if conf.name.startswith(TINY_PREFIX):
        return load_model(conf).id
    if conf.name in EMBEDDED:
        marker = embedded_dir(conf.name) / "weights_hash"
        return ModelId(conf.name, None, conf.dtype, marker.read_text().strip(), tokenizer_hash(driver_tokenizer(conf)))
    return None


def transcoder_width(conf: Config) -> int:
    """The width supernode ids are checked against: the named folder's, else the configured one."""
    cc = conf.circuits
    if cc.transcoders is None:
        return cc.transcoder.width
    return int(_first_layer(conf).tensors["W_dec"].shape[0])


def transcoder_k(conf: Config) -> int:
    """Active features per token of the transcoders: the named folder's, else the configured k."""
    cc = conf.circuits
    return cc.transcoder.k if cc.transcoders is None else int(_first_layer(conf).tensors["k"])


def _first_layer(conf: Config):
    cc = conf.circuits
    parent, _, key = cc.transcoders.rstrip("/").rpartition("/")
    root, _, name = parent.rpartition("/")
    item = Stage(root, name, key).load("layer_00")
    if item is None:
        raise ConfigError(f"circuits.transcoders: {cc.transcoders} holds no transcoder stage (no item layer_00)")
    return item


def check_inputs(conf: Config, prompts: list[str] | None = None) -> None:
    from lensflow.tasks.circuits.supernodes import load_supernodes
    from lensflow.tasks.circuits.texts import graph_prompts

    cc = conf.circuits
    n_layers = check_mappable(conf.model)
    load_antonyms(list(cc.languages))
    bad = [l for l in cc.layer_list(n_layers) if not 0 <= l < n_layers]
    if bad:
        raise ConfigError(f"config key 'circuits.layers': {bad} out of range 0..{n_layers - 1} for {conf.model.name}")
    width = transcoder_width(conf)
    if cc.transcoders is not None and (model := driver_model_id(conf.model)) is not None:
        load_transcoders(cc.transcoders, model, n_layers, "circuits.transcoders")  # another model's: refused
    if cc.supernodes is not None:
        load_supernodes(cc.supernodes, n_layers, width)
    check_prompts(conf, prompts if prompts is not None else graph_prompts(list(cc.languages), cc.graph_pairs,
                                                                          cc.prompts), n_layers, transcoder_k(conf))
