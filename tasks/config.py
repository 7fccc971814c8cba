"""Typed run configuration: YAML in, `--set KEY=VALUE` on top, validated before any work starts.

Every error is one line naming the offending key (or file), because users meet these at the
command line and in Prefect's run logs, where a pydantic traceback helps nobody.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lensflow.tasks.redact import MASK, redact

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")


class ConfigError(ValueError):
    """A bad config key, value or input file; the message is a single line meant for the user."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConf(Section):
    name: str = "smollm2-135m"  # embedded name, a Hugging Face id, a local path, or tiny-<family>
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    revision: str | None = None
    trust_remote_code: bool = False

    @field_validator("device")
    @classmethod
    def _no_cpu_float16(cls, v: str, info) -> str:
        if v == "cpu" and info.data.get("dtype") == "float16":  # see tasks/devices.py
            raise ValueError("model.dtype=float16 needs a GPU; use float32 or bfloat16 on a CPU")
        return v


class DataConf(Section):
    prompts_file: str | None = None  # .txt (one prompt per line) or .jsonl ({"text": ...}); None = built-in text set
    hf_dataset: str | None = None  # e.g. "wikitext:wikitext-103-raw-v1" (name:config), read where the user has it
    hf_split: str = "train"
    text_field: str = "text"
    max_prompts: int | None = Field(default=256, gt=0)
    max_tokens: int = Field(default=64, gt=1)  # prompts are truncated to this many tokens
    seed: int = 0

    @field_validator("prompts_file")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        if v is None or "://" in v:
            return v
        p = Path(v)
        if not p.is_file():
            raise ValueError(f"file not found: {v}")
        if p.suffix not in {".txt", ".jsonl"}:
            raise ValueError(f"expected a .txt or .jsonl file, got {v}")
        return v


class StoreConf(Section):
    root: str = ".lensflow/store"  # local directory or fsspec URL (s3://bucket/prefix)
    chunk_size: int = Field(default=32, gt=0)  # prompts per zarr chunk = one actor work item
    dtype: Literal["float16", "float32"] = "float32"
    positions: Literal["last", "all"] = "last"
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, min_length=1)  # resid layers (0 = embeddings); None = all
    sites: list[Literal["resid", "attn_head"]] = Field(default=["resid"], min_length=1)
    compression_level: int = Field(default=3, ge=0, le=9)
    # a local root that every Ray node mounts at the same path (NFS, ...): only then may a multi-node cluster use a
    # local root; an object store (s3://...) needs no flag. Not part of any stage key.
    shared: bool = False

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("empty; expected a local folder or an fsspec URL such as s3://bucket/prefix")
        return v


class TrackingConf(Section):
    uri: str = "sqlite:///.lensflow/mlflow.db"  # or http(s)://mlflow-server:5000, or another MLflow store URI
    experiment: str = Field(default="lensflow", min_length=1, pattern=r"\S")
    heartbeat_s: float = Field(default=30.0, gt=0)  # a running flow's MLflow run is tagged alive this often
    # a RUNNING run of the experiment with no heartbeat for this long (and never under 3 of its own heartbeat
    # periods) is closed as KILLED by the next flow that starts: its process died without closing it
    stale_after_s: float = Field(default=600.0, gt=0)
    parent_run_id: str | None = None  # set by `lensflow sweep`: this run is nested under the sweep's run

    @field_validator("stale_after_s")
    @classmethod
    def _stale(cls, v: float, info) -> float:
        beat = info.data.get("heartbeat_s")
        if beat is not None and v < 2 * beat:
            raise ValueError(f"expected at least 2 x tracking.heartbeat_s ({2 * beat:g}), or live runs look stale")
        return v

    @field_validator("uri")
    @classmethod
    def _scheme(cls, v: str) -> str:
        scheme = v.split(":", 1)[0].split("+", 1)[0] if ":" in v else ""
        if scheme not in TRACKING_SCHEMES:
            raise ValueError(f"expected an MLflow tracking URI ({', '.join(TRACKING_SCHEMES)})")
        return v


class RayConf(Section):
    address: str = ""  # "" = a private local Ray; "auto", ray://head:10001 (client) or head:6379 (GCS) = join
    actors: int = Field(default=2, gt=0)  # the 2-core demo machine: one actor per core
    cpus_per_actor: float = Field(default=1.0, gt=0)
    gpus_per_actor: float | Literal["auto"] = "auto"  # auto = 1 when the cluster has GPUs, else 0
    max_restarts: int = Field(default=3, ge=0)
    torch_threads: int | None = None  # per actor; None = cpus_per_actor
    # the longest a stage waits with nothing finishing (a model actor starting, a work item, a Ray task) before
    # it fails naming itself: covers model loads and the slowest item, never an unplaceable request
    timeout_s: float = Field(default=1800.0, gt=0)
    connect_timeout_s: float = Field(default=30.0, gt=0)  # ray.address must answer within this
    # environment variables copied from the driver to every Ray worker, by name (values are never logged): add
    # e.g. HF_TOKEN, MLFLOW_TRACKING_PASSWORD or AWS_SECRET_ACCESS_KEY where the cluster's workers need them
    env_vars: list[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]] = [
        "LENSFLOW_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM"]

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        if not re.fullmatch(r"|auto|(ray://)?[\w.\-]+:\d+", v):
            raise ValueError('expected "" (a local Ray), "auto", ray://HOST:PORT or HOST:PORT')
        return v


class FutureLensConf(Section):
    """Future Lens (Pal et al. 2023). Samples are cut from data.* texts (tasks/future_lens_samples.py); every
    stage is found again under store.root by its key (tasks/future_lens.py)."""

    min_prefix_tokens: int = Field(default=4, gt=0)  # samples: positions T >= this - 1 of each text (< data.max_tokens)
    n_train: int = Field(default=800, gt=0)  # caps, after the model-correct filter
    n_test: int = Field(default=200, gt=0)
    test_fraction: float = Field(default=0.2, gt=0, lt=1)  # share of texts held out (split by text, seeded)
    n_future: int = Field(default=4, ge=1, le=8)  # offsets N = 0..n_future-1
    ks: list[Annotated[int, Field(gt=0)]] = [1, 5, 10]  # Precision@k; must include 1 (the headline P@1)
    ngram_order: int = Field(default=4, ge=2)
    linear_layers: list[int] | None = None  # None = every resid layer 0..n_layers
    causal_layers: list[int] | None = None  # fixed/learned prompts; None = every causal_layer_stride-th, last included
    causal_layer_stride: int = Field(default=5, gt=0)
    ridge: list[float] = [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]  # relative penalties, chosen on a validation tenth of train
    hidden_kl_steps: int = Field(default=0, ge=0)  # optional KL fine-tune of the ridge map
    hidden_kl_lr: float = Field(default=1e-3, gt=0)
    vocab_rank: int = Field(default=64, gt=0)
    vocab_steps: int = Field(default=300, ge=0)
    vocab_lr: float = Field(default=3e-3, gt=0)
    vocab_batch: int = Field(default=256, gt=0)
    vocab_weight_decay: float = Field(default=1e-2, ge=0)
    fixed_prompts: list[Annotated[str, Field(min_length=1)]] = Field(
        default=['Hello! Could you please tell me more about "', "Tell me about"], min_length=1)
    soft_prompt_len: int = Field(default=10, gt=0)
    soft_prompt_init: str = 'Hello! Could you please tell me more about "'
    soft_prompt_steps: int = Field(default=80, ge=0)
    soft_prompt_batch: int = Field(default=16, gt=0)
    soft_prompt_lr: float = Field(default=0.1, gt=0)  # relative to the RMS of the initial prompt embeddings
    eval_batch: int = Field(default=50, gt=0)
    teacher_forcing: bool = True  # causal methods at N>0 see the model's greedy tokens; False = the lens's own
    # GPUs per model-free Ray task (vocabulary probes); auto = 0.25 where the cluster has GPUs (4 share one), else 0
    gpus_per_task: Annotated[float, Field(ge=0)] | Literal["auto"] = "auto"
    seed: int = 0

    @field_validator("ks")
    @classmethod
    def _has_one(cls, v: list[int]) -> list[int]:
        if 1 not in v:
            raise ValueError("must include 1: Precision@1 is what every figure and the best-layer choice use")
        return sorted(set(v))


class FunctionVectorsConf(Section):
    """Function vectors (Todd et al. 2024): mean head outputs, a head-patching sweep, the vector and its tests."""

    icl_tasks: list[str] | None = Field(default=None, min_length=1)  # ICL task names; None = every built-in ICL task plus those in icl_task_paths
    icl_task_paths: list[str] = []  # extra ICL task files or folders of <name>.json ([{"input", "output"}, ...])
    seed: int = 0  # ICL task splits (train / valid / test) and prompt sampling
    n_shots: int = Field(default=10, gt=0)
    query_template: str = "Q: {input}\nA:"
    answer_template: str = " {output}"  # the first token of this continuation is the scored answer
    separator: str = "\n\n"
    natural_templates: list[str] = ['The word "{input}" means', "When I think of {input}, I think of", "{input}:"]
    n_clean: int = Field(default=5, gt=0)  # clean prompts per ICL task for the mean head outputs (paper: 100)
    n_shuffled: int = Field(default=3, gt=0)  # shuffled-label prompts per ICL task for the patching sweep (paper: 25)
    n_test: int = Field(default=12, gt=0)  # test queries per ICL task, before keeping those solved at n_shots (paper: 50)
    n_valid: int = Field(default=12, gt=0)  # validation queries per ICL task for layer=auto, filtered like n_test
    demo_sets: int | None = Field(default=3, gt=0)  # demonstration sets shared by test queries; None = one per query
    filter_correct: bool = True  # evaluate only test queries the model answers right at n_shots (as the paper)
    top_k: int | None = Field(default=None, gt=0)  # heads in the vector; None = min(10, all heads // 4)
    layer: int | Literal["auto"] = "auto"  # resid layer the vector is added at (0 = embeddings); auto = best
    # zero-shot accuracy with the vector on the ICL tasks' validation queries (mean over ICL tasks), among the
    # layer sweep's layers (every layer_sweep_stride-th; every layer when the stride is 0)
    scale: float = 1.0  # multiplier on the vector when added
    layer_sweep_stride: int = Field(default=3, ge=0)  # evaluate adding the vector at every k-th layer; 0 = off
    # directed pairs "<source>-><target>" of ICL tasks: the source's vector added to the target's zero-shot test
    # prompts, beside the target's own vector; a source or target not in icl_tasks is swept for its head means only.
    # Default: both directions of the only same-task pairs SmolLM2-135M solves at 10 shots in two languages
    # (capitalizing English, French and Spanish words; the candidates measured: tasks/data/icl/README.md)
    transfer: list[str] = ["capitalize->capitalize_french", "capitalize_french->capitalize",
                           "capitalize->capitalize_spanish", "capitalize_spanish->capitalize",
                           "capitalize_french->capitalize_spanish", "capitalize_spanish->capitalize_french"]
    pack_tokens: int = Field(default=1024, gt=0)  # most query tokens packed into one shared-prefix forward pass

    @field_validator("layer", mode="before")
    @classmethod
    def _layer(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        raise ValueError("expected a resid layer (an int >= 0) or 'auto'")

    @field_validator("query_template", "natural_templates")
    @classmethod
    def _has_input(cls, v: str | list[str]) -> str | list[str]:
        for t in [v] if isinstance(v, str) else v:
            if "{input}" not in t:
                raise ValueError(f"template must contain {{input}}: {t!r}")
        return v

    @field_validator("answer_template")
    @classmethod
    def _has_output(cls, v: str) -> str:
        if "{output}" not in v:
            raise ValueError("template must contain {output}")
        return v

    @field_validator("transfer")
    @classmethod
    def _directed_pairs(cls, v: list[str]) -> list[str]:
        pairs = []
        for s in v:
            ends = [e.strip() for e in s.split("->")]
            if len(ends) != 2 or not all(ends) or ends[0] == ends[1]:
                raise ValueError(f"expected '<source ICL task>-><target ICL task>' of two ICL tasks, got {s!r}")
            pairs.append("->".join(ends))
        return list(dict.fromkeys(pairs))

    def transfer_pairs(self) -> list[tuple[str, str]]:
        """(source, target) ICL task names of each directed transfer."""
        return [tuple(p.split("->")) for p in self.transfer]


class LensesConf(Section):
    """Logit lens + tuned lens (Belrose et al. 2023), trained on every position of the first max_prompts
    data.* texts (a positions=all store); the last heldout share of those prompts is the evaluation split."""

    max_prompts: int | None = Field(default=160, gt=0)  # None = data.max_prompts
    heldout: float = Field(default=0.2, gt=0, lt=1)
    epochs: int = Field(default=2, gt=0)
    batch_tokens: int = Field(default=64, gt=0)
    lr: float = Field(default=2e-3, gt=0)  # AdamW, linear decay to zero
    weight_decay: float = Field(default=0.0, ge=0)
    compute_dtype: Literal["bfloat16", "float32"] = "bfloat16"  # frozen unembedding matmuls while training
    seed: int = 0
    # GPUs per lens Ray task (targets per chunk, translator per layer); auto = 0.25 where the cluster has GPUs, else 0
    gpus_per_task: Annotated[float, Field(ge=0)] | Literal["auto"] = "auto"
    grid_prompt: str = "The Eiffel Tower is in the city of Paris, which is the capital of"


class MultilingualConf(Section):
    """Shared multilingual features (Anthropic 2025): per-layer SAEs, then cross-language active-set overlap."""

    class SAE(Section):
        activation: Literal["topk", "relu"] = "topk"
        expansion: int = Field(default=4, gt=0)  # width = expansion * d_model
        k: int = Field(default=32, gt=0)  # topk: active features per token
        l1: float = Field(default=1e-3, ge=0)  # relu: L1 coefficient on the (unit-decoder) codes
        steps: int = Field(default=300, gt=0)
        batch_tokens: int = Field(default=1024, gt=0)
        lr: float = Field(default=1e-3, gt=0)
        train_prompts: int = Field(default=512, gt=1)  # general-text prompts whose every token is a sample
        holdout: float = Field(default=0.1, gt=0, lt=1)  # last fraction of prompts, for variance explained
        # parallel paragraphs (a seeded choice of indices, the same in every language) that train the SAE beside
        # the general text and are never measured: an English-only SAE reconstructs other languages poorly
        train_paragraphs: int = Field(default=50, ge=0)  # of the 120 shipped lines: 70 stay measured
        general_share: float = Field(default=0.25, ge=0, le=1)  # of training tokens; the rest: languages, equally

    class Neurons(Section):
        enabled: bool = True
        quantile: float = Field(default=0.99, gt=0, lt=1)  # active = above this per-neuron quantile on general text
        threshold: float | None = None  # absolute threshold instead of the calibrated quantile
        calibration_prompts: int = Field(default=64, gt=0)
        batch_prompts: int = Field(default=16, gt=0)  # texts per actor call (neuron activations are large)

    languages: list[str] = ["en", "fr", "es", "de"]
    pairs: list[str] | None = None  # ["en-fr", ...]; None = every pair of `languages`
    files: dict[str, str] | None = None  # {lang: aligned .txt, one paragraph per line}; None = shipped corpus
    max_paragraphs: int | None = Field(default=None, gt=1)
    paragraph_tokens: int = Field(default=128, gt=1)  # paragraphs are truncated to this many tokens
    layers: list[int] | None = None  # resid layers; None = every `layer_stride`-th layer from 0, plus the last
    layer_stride: int = Field(default=3, gt=0)
    skip_first: bool = True  # drop each text's first token (BOS / attention sink) from training and active sets
    seed: int = 0
    sae: SAE = SAE()
    neurons: Neurons = Neurons()


class CausalTraceConf(Section):
    """Causal tracing (Meng et al. 2022): corrupt the subject, restore one clean state, measure P(answer) back."""

    facts_file: str | None = None  # JSONL of {"prompt", "subject", "target"[, "relation"]}; None = shipped facts
    filter_correct: bool = True  # trace only facts whose greedy first token is the answer's (as the paper)
    max_facts: int | None = Field(default=12, gt=0)  # traced facts after the filter, taken round-robin over relations
    samples: int = Field(default=3, gt=0)  # noise draws per fact (paper: 10)
    noise_scale: float = Field(default=3.0, ge=0)  # noise std = this x std of the input embedding matrix (paper: 3)
    window: int = Field(default=10, gt=0)  # MLP / attention outputs restored over this many layers (paper: 10)
    seed: int = 0  # noise draws, seeded per fact
    batch_tokens: int = Field(default=8192, gt=0)  # most tokens per restoration forward pass (memory, not results)


class Config(Section):
    model: ModelConf = ModelConf()
    data: DataConf = DataConf()
    store: StoreConf = StoreConf()
    tracking: TrackingConf = TrackingConf()
    ray: RayConf = RayConf()
    future_lens: FutureLensConf = FutureLensConf()
    function_vectors: FunctionVectorsConf = FunctionVectorsConf()
    lenses: LensesConf = LensesConf()
    multilingual: MultilingualConf = MultilingualConf()
    causal_trace: CausalTraceConf = CausalTraceConf()

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, the shape MLflow params and `--set` use."""
        return _flatten(self.model_dump(mode="json"))

    def fingerprint(self, *sections: str) -> str:
        """Stable hash of the named sections, so reruns of the same work find the same store group."""
        payload = {s: getattr(self, s).model_dump(mode="json") for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Put value at a dotted key, refusing keys the schema does not have (typos must not pass silently)."""
    parts = key.split(".")
    model: type[BaseModel] = Config
    node = tree
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "top level"
            raise ConfigError(f"unknown config key '{key}' (known at {where}: {', '.join(fields)})")
        ann = fields[part].annotation
        if i == len(parts) - 1:
            node[part] = value
            return
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            raise ConfigError(f"unknown config key '{key}' ('{'.'.join(parts[: i + 1])}' is not a section)")
        model = ann
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' must be a mapping")


def _check_tree(tree: Any, model: type[BaseModel] = Config, prefix: str = "") -> None:
    if not isinstance(tree, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'top level'}' must be a mapping")
    for k, v in tree.items():
        fields = model.model_fields
        if k not in fields:
            raise ConfigError(f"unknown config key '{prefix}{k}' (known: {', '.join(fields)})")
        ann = fields[k].annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            _check_tree(v, ann, f"{prefix}{k}.")


def _one_line(err: ValidationError) -> str:
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    return f"config key '{key}': {msg} (got {redact(repr(e.get('input')))})"


def with_overrides(conf: Config, updates: dict[str, Any]) -> Config:
    """A copy of conf with dotted keys replaced, validated like `--set` (used for store variants of one run)."""
    tree = conf.model_dump(mode="json")
    for key, value in updates.items():
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects KEY=VALUE, got '{item}'")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def resolve_path(path: str | Path) -> Path:
    """Config names resolve against the working directory first, then the shipped conf/ folder."""
    p = Path(path)
    if p.is_file():
        return p
    for cand in (CONF_DIR / p, CONF_DIR / p.name, CONF_DIR / f"{p}.yaml"):
        if cand.is_file():
            return cand
    raise ConfigError(f"config file not found: {path}")


SECRET_OVERRIDES = "LENSFLOW_SECRET_OVERRIDES"


def public_overrides(overrides: list[str]) -> list[str]:
    """Overrides as Prefect may record them (flow run parameters are stored and shown): credentials masked. The
    originals travel to load_config in this process's environment, never into Prefect's database."""
    secret = [o for o in overrides if redact(o) != o]
    if secret:
        os.environ[SECRET_OVERRIDES] = json.dumps(secret)
    return [redact(o) for o in overrides]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    tree: dict[str, Any] = {}
    if path is not None:
        p = resolve_path(path)
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
        _check_tree(tree)
    secret = dict(parse_override(o) for o in json.loads(os.environ.get(SECRET_OVERRIDES, "[]")))
    for item in overrides or []:
        key, value = parse_override(item)
        if isinstance(value, str) and MASK in value and key in secret:  # masked by public_overrides
            value = secret[key]
        _set_dotted(tree, key, value)
    try:
        conf = Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None
    if "://" not in conf.store.root:  # Ray workers run in other directories: pin local paths now
        conf.store.root = str(Path(conf.store.root).resolve())
    return conf
