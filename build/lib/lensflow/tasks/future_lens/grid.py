"""The Future Lens grid of one prompt: layer x token, each cell the logit-lens token and the tokens a run's learned
prompt of that layer decodes from the state (`lensflow lens "prompt"`)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from lensflow.tasks.core import tracking
from lensflow.tasks.core.config import Config, ConfigError
from lensflow.tasks.core.hooks import Read, trace
from lensflow.tasks.core.models import load_model, prepare
from lensflow.tasks.core.plots import lens_grid, save_grid
from lensflow.tasks.future_lens.report import SOFT_PROMPTS, artifact
from lensflow.tasks.future_lens.soft_prompt import lens_generate


def _soft_prompt_layers(uri: str, run_id: str) -> list[int]:
    files = tracking.artifact_files(uri, run_id, SOFT_PROMPTS)
    return sorted(int(m.group(1)) for f in files if (m := re.search(r"layer_(\d+)\.safetensors$", f)))


@torch.no_grad()
def render_grid(conf: Config, prompt: str, lens: str = "future", run_id: str | None = None,
                out_dir: str | Path = ".lensflow/grids") -> dict[str, str]:
    """Layer x token grid for `prompt`: each cell shows the logit-lens token and, after '→', the tokens the
    learned prompt of that layer decodes from the state (greedy, n_future of them); colour = the lens's
    probability of its first token. Soft prompts come from run_id, else the latest finished future-lens run
    of the experiment. PNG + HTML are written locally and logged to that run under grids/."""
    if lens != "future":
        raise ConfigError(f"--lens {lens}: the Future Lens grid is --lens future")
    uri = conf.tracking.uri
    run_id = run_id or tracking.latest_run(uri, conf.tracking.experiment, "future-lens", conf.model.name)
    if not run_id:
        raise ConfigError(f"no finished future-lens run of {conf.model.name} in experiment "
                          f"'{conf.tracking.experiment}'; run `lensflow run future-lens` first or pass --run-id")
    tracking.check_reusable(uri, run_id, conf.model.name)
    layers = _soft_prompt_layers(uri, run_id)
    if not layers:
        raise ConfigError(f"run {run_id} has no soft prompts (artifacts {SOFT_PROMPTS}/layer_XX.safetensors)")
    prepare(conf.model)
    lm = load_model(conf.model)
    tracking.check_reusable(uri, run_id, conf.model.name, lm.weights_hash)  # same name, other weights: refused
    enc = lm.encode([prompt])
    ids = enc["input_ids"][0]
    with trace(lm, reads=[Read("resid", l) for l in layers]) as t:
        lm.base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
    tok = lm.tokenizer
    tokens = [tok.decode([i]) for i in ids.tolist()]
    cells, probs = [], np.zeros((len(layers), len(tokens)))
    for i, l in enumerate(layers):
        soft = tracking.load_tensors(uri, run_id, artifact("soft_prompt", l))["prompt"]
        h = t["resid", l][0]
        lens_tok = lm.decode(h).argmax(-1).tolist()
        gen, p = lens_generate(lm, soft, l, h, conf.future_lens.n_future)
        row = []
        for j in range(len(tokens)):
            row.append(f"{tok.decode([lens_tok[j]])!r}→{tok.decode(gen[j].tolist())!r}")
            probs[i, j] = float(p[j, 0])
        cells.append(row)
    title = f"Future Lens: {prompt!r} ({conf.model.name}, soft prompts of run {run_id[:8]})"
    fig, page = lens_grid(tokens, layers, cells, probs, title)
    paths = save_grid(fig, page, "future_lens", prompt, Path(out_dir).resolve())
    png, html = paths["png"], paths["html"]
    ref = tracking.RunRef(tracking.local_uri(uri), "", run_id)
    for path in paths.values():
        tracking.log_file(ref, path, "grids")
    print(f"grid: {png} and {html} (logged to run {run_id} under grids/)")
    return {"png": str(png), "html": str(html), "run_id": run_id}
