"""Typed run configuration: YAML in, `--set KEY=VALUE` on top, validated before any work starts.

Every error is one line naming the offending key (or file), because users meet these at the
command line and in Prefect's run logs, where a pydantic traceback helps nobody.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


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
    layers: list[int] | None = None  # residual layers to keep (0 = embeddings); None = all
    sites: list[Literal["resid", "attn_head"]] = ["resid"]
    compression_level: int = Field(default=3, ge=0, le=9)


class TrackingConf(Section):
    uri: str = "sqlite:///.lensflow/mlflow.db"
    experiment: str = "lensflow"


class RayConf(Section):
    address: str = ""  # "" = start a local Ray; "auto" or "ray://head:10001" = connect
    actors: int = Field(default=1, gt=0)
    cpus_per_actor: float = Field(default=1.0, gt=0)
    gpus_per_actor: float | Literal["auto"] = "auto"  # auto = 1 when the cluster has GPUs, else 0
    max_restarts: int = Field(default=3, ge=0)
    torch_threads: int | None = None  # per actor; None = cpus_per_actor


class FutureLensConf(Section):
    pass


class FunctionVectorsConf(Section):
    pass


class LensesConf(Section):
    pass


class MultilingualConf(Section):
    pass


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
    return f"config key '{key}': {msg} (got {e.get('input')!r})"


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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    tree: dict[str, Any] = {}
    if path is not None:
        p = resolve_path(path)
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
        _check_tree(tree)
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None
