"""Dictionaries in the SAELens layout, so other tools load lensflow's SAEs and lensflow reads pretrained ones.

A folder holds `cfg.json` (d_in, d_sae, architecture, activation_fn_str, activation_fn_kwargs, hook_name, ...) and
`sae_weights.safetensors` (W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]); SAELens
computes z = act(W_enc^T-product of (x - b_dec) + b_enc) with apply_b_dec_to_input, x_hat = z W_dec + b_dec.
lensflow's SAE divides its input by a per-layer scalar s (sae.py); the export folds s in exactly:
W_enc' = W_enc^T / s, W_dec' = s W_dec, b_dec' = s b_dec, so codes and reconstructions are unchanged and the
folder needs no normalisation step in the reader.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lensflow.tasks.core.config import ConfigError
from lensflow.tasks.core.dictionaries.autoencoder import SparseAutoencoder

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
WEIGHT_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")


def export_sae(sae: SparseAutoencoder, folder: str | Path, hook_name: str = "", model_name: str = "",
               hook_layer: int = -1) -> Path:
    """Write `sae` to folder in the SAELens layout (created; an existing folder's two files are replaced)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    s = float(sae.scale)
    with torch.no_grad():
        weights = {"W_enc": (sae.W_enc.T / s), "b_enc": sae.b_enc, "W_dec": sae.W_dec * s, "b_dec": sae.b_dec * s}
        save_file({k: v.detach().float().cpu().contiguous() for k, v in weights.items()}, out / WEIGHTS)
    topk = sae.activation == "topk"
    cfg = {"d_in": sae.W_dec.shape[1], "d_sae": sae.width, "architecture": "topk" if topk else "standard",
           "activation_fn_str": "topk" if topk else "relu", "activation_fn_kwargs": {"k": sae.k} if topk else {},
           "apply_b_dec_to_input": True, "normalize_activations": "none", "dtype": "float32", "device": "cpu",
           "hook_name": hook_name, "hook_layer": hook_layer, "model_name": model_name, "prepend_bos": True,
           "finetuning_scaling_factor": False, "context_size": 0, "dataset_path": "", "sae_lens_training_version": None}
    (out / CFG).write_text(json.dumps(cfg, indent=2))
    return out


def import_sae(folder: str | Path) -> SparseAutoencoder:
    """A SAELens-layout folder as a SparseAutoencoder (topk or relu/standard, apply_b_dec_to_input either way);
    anything else fails with one line naming the file."""
    d = Path(folder)
    cfg_path, w_path = d / CFG, d / WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise ConfigError(f"dictionary.import: {d} is not a SAELens folder (needs {CFG} and {WEIGHTS})")
    try:
        cfg = json.loads(cfg_path.read_text())
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ConfigError(f"dictionary.import: {cfg_path} is not a SAELens cfg.json (needs d_in and d_sae)") from None
    act = cfg.get("activation_fn_str", "relu")
    arch = cfg.get("architecture", "standard")
    if arch not in ("standard", "topk") or act not in ("relu", "topk"):
        raise ConfigError(f"dictionary.import: {cfg_path}: architecture '{arch}' / activation '{act}' is not supported "
                          "(standard relu or topk)")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise ConfigError(f"dictionary.import: {cfg_path}: normalize_activations "
                          f"'{cfg['normalize_activations']}' is not supported (none)")
    try:
        w = load_file(w_path)
    except Exception as exc:  # safetensors raises its own error types
        raise ConfigError(f"dictionary.import: {w_path} is not a safetensors file ({exc})") from None
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    bad = [k for k, s in shapes.items() if k not in w or tuple(w[k].shape) != s]
    if bad:
        raise ConfigError(f"dictionary.import: {w_path}: {bad[0]} missing or not of shape {shapes[bad[0]]} "
                          f"(d_in {d_in}, d_sae {d_sae} from {CFG})")
    k = int((cfg.get("activation_fn_kwargs") or {}).get("k", 1))
    topk = "topk" in (act, arch)
    if topk and not 0 < k <= d_sae:
        raise ConfigError(f"dictionary.import: {cfg_path}: k={k} does not fit d_sae={d_sae}")
    sae = SparseAutoencoder(d_in, d_sae, "topk" if topk else "relu", k=k)
    b_dec = w["b_dec"].float()
    b_enc = w["b_enc"].float()
    if not cfg.get("apply_b_dec_to_input", True):  # z = act(x W_enc + b_enc): fold -b_dec W_enc into b_enc
        b_enc = b_enc + b_dec @ w["W_enc"].float()
    with torch.no_grad():
        sae.W_enc.copy_(w["W_enc"].float().T)
        sae.W_dec.copy_(w["W_dec"].float())
        sae.b_enc.copy_(b_enc)
        sae.b_dec.copy_(b_dec)
        sae.scale.fill_(1.0)
    return sae
