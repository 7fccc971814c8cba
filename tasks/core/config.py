"""Typed run configuration: YAML in, `--set KEY=VALUE` on top, validated before any work starts.

Every error is one line naming the offending key (or file), because users meet these at the
command line and in Prefect's run logs, where a pydantic traceback helps nobody.
"""

from __future__ import annotations

import json
import os
import re
from importlib.util import find_spec
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lensflow.tasks.core.redact import MASK, redact

# the shipped configs: conf/ of a checkout, installed as the package data lensflow.conf (so a wheel has them too)
CONF_DIR = Path(next(p for p in find_spec("lensflow.conf").submodule_search_locations if Path(p).is_dir()))


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
        if v == "cpu" and info.data.get("dtype") == "float16":  # see tasks/core/devices.py
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
    # block sites (attn_head, mlp_in, mlp_out) at blocks numbered like `layers` (block l reads resid layer l; every
    # block when layers is None): mlp_in + mlp_out are a transcoder's training pairs
    sites: list[Literal["resid", "attn_head", "mlp_in", "mlp_out"]] = Field(default=["resid"], min_length=1)
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
    actors: int | Literal["auto"] = 2  # the 2-core demo machine: one actor per core
    # actors=auto: as many as the cluster's free GPUs (CPUs where it has none) hold, within these bounds; the pool
    # grows when nodes join and goes on with fewer when a node is lost for good
    min_actors: int = Field(default=1, gt=0)
    max_actors: int = Field(default=64, gt=0)
    # a Prefect global concurrency limit holding the cluster's GPU count (`prefect gcl create NAME --limit 8`): a run
    # takes its GPUs (with actors=auto: max_actors' worth) from it before its actors start, and waits up to
    # ray.timeout_s while other runs hold them
    gpu_limit: str = ""
    # where model actors find the model once per cluster (tasks/core/weights.py): "" = {store.root}/models, another
    # fsspec URL or shared folder, or "none" (each actor loads from the source: the Hub, the driver's folder)
    weights_cache: str = ""
    cpus_per_actor: float = Field(default=1.0, gt=0)
    gpus_per_actor: float | Literal["auto"] = "auto"  # auto = 1 when the cluster has GPUs, else 0
    max_restarts: int = Field(default=3, ge=0)
    torch_threads: int | None = None  # per actor; None = cpus_per_actor
    # the longest a stage waits with nothing finishing (a model actor starting, a work item, a Ray task) before
    # it fails naming itself: covers model loads and the slowest item, never an unplaceable request
    timeout_s: float = Field(default=1800.0, gt=0)
    connect_timeout_s: float = Field(default=30.0, gt=0)  # ray.address must answer within this
    # environment variables copied from the driver to every Ray worker, by name, through the job's runtime_env (which
    # the dashboard shows). Credentials need no entry: the store's, the tracking server's and the Hub's reach every
    # worker from the driver's environment by value (tasks/core/credentials.py), as does a secret-looking name here
    env_vars: list[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]] = [
        "LENSFLOW_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM"]

    @field_validator("actors", mode="before")
    @classmethod
    def _actors(cls, v: object) -> int | str:
        if v == "auto":
            return v
        try:
            n = int(str(v))
        except ValueError:
            n = 0
        if n < 1 or isinstance(v, (bool, float)):
            raise ValueError('expected a count of at least 1, or "auto"')
        return n

    @field_validator("max_actors")
    @classmethod
    def _max_actors(cls, v: int, info) -> int:
        low = info.data.get("min_actors")
        if low is not None and v < low:
            raise ValueError(f"expected at least ray.min_actors ({low})")
        return v

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        if not re.fullmatch(r"|auto|(ray://)?[\w.\-]+:\d+", v):
            raise ValueError('expected "" (a local Ray), "auto", ray://HOST:PORT or HOST:PORT')
        return v


class Config(Section):
    """The sections every experiment shares. lensflow.tasks.registry adds one section per experiment; the core
    reads only these."""

    model: ModelConf = ModelConf()
    data: DataConf = DataConf()
    store: StoreConf = StoreConf()
    tracking: TrackingConf = TrackingConf()
    ray: RayConf = RayConf()

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, the shape MLflow params and `--set` use."""
        return _flatten(self.model_dump(mode="json"))


C = TypeVar("C", bound=Config)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _set_dotted(tree: dict[str, Any], key: str, value: Any, schema: type[BaseModel]) -> None:
    """Put value at a dotted key, refusing keys the schema does not have (typos must not pass silently)."""
    parts = key.split(".")
    model = schema
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


def _check_tree(tree: Any, model: type[BaseModel], prefix: str = "") -> None:
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


def with_overrides(conf: C, updates: dict[str, Any]) -> C:
    """A copy of conf with dotted keys replaced, validated like `--set` (used for store variants of one run)."""
    tree = conf.model_dump(mode="json")
    for key, value in updates.items():
        _set_dotted(tree, key, value, type(conf))
    try:
        return type(conf).model_validate(tree)
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


def load(schema: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """A YAML file (a path, or a name in the shipped conf/) with `--set` overrides on top, validated against
    schema (lensflow.tasks.registry.load_config passes every experiment's sections)."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = resolve_path(path)
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
        _check_tree(tree, schema)
    secret = dict(parse_override(o) for o in json.loads(os.environ.get(SECRET_OVERRIDES, "[]")))
    for item in overrides or []:
        key, value = parse_override(item)
        if isinstance(value, str) and MASK in value and key in secret:  # masked by public_overrides
            value = secret[key]
        _set_dotted(tree, key, value, schema)
    try:
        conf = schema.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None
    if "://" not in conf.store.root:  # Ray workers run in other directories: pin local paths now
        conf.store.root = str(Path(conf.store.root).resolve())
    return conf
