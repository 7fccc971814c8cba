"""What the multilingual flow logs: per-layer metrics (step = layer), overlap and SAE-quality figures, the table,
and the run summary the CLI prints. Metric names are the README's."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lensflow.tasks.core import tracking
from lensflow.tasks.core.dictionaries.pages import DATA, INDEX, LayerPages, write_site
from lensflow.tasks.core.extraction import Extraction
from lensflow.tasks.core.models import ModelInfo
from lensflow.tasks.core.plots import layer_curves
from lensflow.tasks.core.tracking import RunRef
from lensflow.tasks.multilingual.neurons import NeuronOverlaps
from lensflow.tasks.multilingual.overlap import (
    LayerOverlap,
    PairOverlap,
    SAELayerResult,
)

if TYPE_CHECKING:
    from lensflow.tasks.multilingual.plan import MultilingualInputs
    from lensflow.tasks.multilingual.transcoders import TranscoderLayerResult

KINDS = ("translated", "unrelated")
MEASURES = ("whether translations of a paragraph activate the same SAE features and MLP neurons: Jaccard overlap "
            "translated vs unrelated, and its gap, per layer; SAE quality (FVE) per layer")


@dataclass(frozen=True)
class Summary:
    """The run's outcome and what it computed (zero / empty everywhere when every stage was found)."""

    layers: list[int]
    paragraphs: int  # measured per language
    train_rows: list[int]  # parallel-file lines that trained the SAEs (every language), never measured
    gap: dict[int, float]  # SAE features, per resid layer
    neurons_gap: dict[int, float]  # MLP neurons, per block
    fve: dict[int, float]  # held-out general text
    fve_lang: dict[str, dict[int, float]]  # language -> layer -> FVE on its measured paragraphs (never trained on)
    l0: dict[int, float]
    peak_pairs: dict[str, PairOverlap]  # SAE overlaps per pair at the peak layer
    neurons_peak_pairs: dict[str, PairOverlap]  # neuron overlaps per pair at the peak block (empty without neurons)
    sae_trained: list[int]  # layers whose SAE this run trained
    overlaps_measured: list[int]  # layers whose SAE overlaps this run measured
    neuron_stages_computed: int
    chunks_computed: int  # activation-store chunks extracted by this run, over every store
    wall_s: float
    table: str
    feature_pages: int = 0  # pages logged under features/ (every layer)
    transcoder_gap: dict[int, float] = field(default_factory=dict)  # per block, mean over pairs
    transcoder_held: dict[int, dict[str, float]] = field(default_factory=dict)  # per block: held-out general text
    transcoder_fve_lang: dict[str, dict[int, float]] = field(default_factory=dict)  # language -> block -> FVE
    transcoder_peak_pairs: dict[str, PairOverlap] = field(default_factory=dict)
    transcoder_table: str = ""

    @property
    def peak_layer(self) -> int:
        return max(self.gap, key=self.gap.get)

    @property
    def neurons_peak_block(self) -> int | None:
        return max(self.neurons_gap, key=self.neurons_gap.get) if self.neurons_gap else None

    def text(self) -> str:
        peak, npeak = self.peak_layer, self.neurons_peak_block

        def per_pair(pairs: dict[str, PairOverlap]) -> str:
            return ", ".join(f"{p} {v.gap:+.3f} ({v.gap / v.gap_se:.1f} SE)" for p, v in pairs.items())

        neurons = (f"; neurons block {npeak} ({self.neurons_gap[npeak]:+.3f}: {per_pair(self.neurons_peak_pairs)})"
                   if npeak is not None else "")
        pages = f"\nfeature pages: {self.feature_pages} features, artifact {INDEX}" if self.feature_pages else ""
        if self.transcoder_gap:
            tpeak = max(self.transcoder_gap, key=self.transcoder_gap.get)
            pages += (f"\n{self.transcoder_table}largest translated-unrelated gap in the transcoder basis: block {tpeak} "
                      f"({self.transcoder_gap[tpeak]:+.3f}: {per_pair(self.transcoder_peak_pairs)})")
        return (self.table + f"largest translated-unrelated gap: SAE resid layer {peak} ({self.gap[peak]:+.3f}: "
                f"{per_pair(self.peak_pairs)})" + neurons + pages)

    def as_dict(self, run_id: str) -> dict:
        return {"run_id": run_id, "layers": self.layers, "paragraphs": self.paragraphs, "train_rows": self.train_rows,
                "peak_layer": self.peak_layer,
                "neurons_peak_block": self.neurons_peak_block, "gap": self.gap, "neurons_gap": self.neurons_gap,
                "fve": self.fve, "fve_lang": self.fve_lang, "l0": self.l0, "sae_trained": self.sae_trained,
                "peak_gap_se": {p: v.gap_se for p, v in self.peak_pairs.items()},
                "neurons_peak_gap_se": {p: v.gap_se for p, v in self.neurons_peak_pairs.items()},
                "overlaps_measured": self.overlaps_measured, "neuron_stages_computed": self.neuron_stages_computed,
                "chunks_computed": self.chunks_computed, "wall_s": self.wall_s, "feature_pages": self.feature_pages,
                "transcoder_gap": self.transcoder_gap, "transcoder_held": self.transcoder_held,
                "transcoder_fve_lang": self.transcoder_fve_lang}


def log_overlaps(run: RunRef, prefix: str, per_layer: dict[int, LayerOverlap]) -> dict[int, float]:
    """translated / unrelated / gap_se per pair, the mean gap and the set sizes, step = layer; the gap per layer."""
    for layer, r in per_layer.items():
        metrics = {f"{prefix}.{kind}.{pair}": getattr(v, kind) for pair, v in r.pairs.items()
                   for kind in (*KINDS, "gap_se")}
        metrics.update({f"{prefix}.gap": r.gap, **{f"{prefix}.size.{l}": s for l, s in r.size.items()}})
        tracking.log_metrics(run, metrics, step=layer)
    return {layer: r.gap for layer, r in per_layer.items()}


def overlap_figure(per_layer: dict[int, LayerOverlap], title: str):
    pairs = next(iter(per_layer.values())).pairs
    panels = {pair: {kind: {l: getattr(r.pairs[pair], kind) for l, r in per_layer.items()} for kind in KINDS}
              for pair in pairs}
    return layer_curves(panels, "Jaccard overlap of active sets", title)


def table(results: dict[int, SAELayerResult], gaps: dict[int, float], ngaps: dict[int, float]) -> str:
    """Per resid layer: SAE quality (FVE on held-out general text, then on each language's measured paragraphs,
    which no SAE trained on), L0, dead features, and the SAE and neuron gaps."""
    langs = list(next(iter(results.values())).fve_lang)
    rows = [f"| layer | SAE FVE general | {' | '.join(f'FVE {l}' for l in langs)} | SAE L0 | dead | SAE gap | "
            "neuron gap (block layer-1) |", "|---" * (len(langs) + 6) + "|"]
    for l, r in results.items():
        ng = ngaps.get(l - 1)
        rows.append(f"| {l} | {r.sae.fve:.3f} | {' | '.join(f'{r.fve_lang[x]:.3f}' for x in langs)} | {r.sae.l0:.1f} | "
                    f"{r.sae.dead:.2f} | {gaps[l]:+.3f} | {'' if ng is None else f'{ng:+.3f}'} |")
    return "\n".join(rows) + "\n"


def log_sae_training(run: RunRef, results: list[SAELayerResult], store: str) -> dict[int, str]:
    """The SAEs this run trained, in the flow's run (no run per layer): settings and stage items (a table), loss
    curves, final loss and held-out metrics per layer (step = layer), each SAE as `sae/layer_LL.safetensors` (read back
    from its stage). Returns layer -> the run holding the SAE (this one), the `multilingual.sae.layer_LL` tags."""
    trained, held = [], {}
    for r in results:
        item = r.sae_stage.load(f"layer_{r.layer:02d}")
        params = {**item.meta["params"], "store": store, "stage_item": r.sae_stage.item_url(f"layer_{r.layer:02d}")}
        trained.append(tracking.LayerTraining(r.layer, params, {"loss": list(item.meta["losses"])}))
        held[r.layer] = {f"multilingual.training.sae.{k}": v for k, v in item.meta["metrics"].items()}
        tracking.log_tensors(run, item.tensors, f"sae/layer_{r.layer:02d}.safetensors")
    tracking.log_layer_training(run, "multilingual_sae", "multilingual.training.sae", trained)
    for layer, metrics in held.items():
        tracking.log_metrics(run, metrics, step=layer)
    return {r.layer: run.run_id for r in results}


TRANSCODER_METRICS = ("fve", "l0", "dead", "loss_clean", "loss_spliced")


def transcoder_table(results: list[TranscoderLayerResult], gaps: dict[int, float]) -> str:
    """Per block: transcoder quality on held-out general text (FVE of the MLP output, L0, dead, next-token loss
    clean -> spliced in), FVE on each language's measured paragraphs, and the gap in the transcoder basis."""
    langs = list(results[0].fve_lang)
    rows = [f"| block | transcoder FVE general | {' | '.join(f'FVE {l}' for l in langs)} | L0 | dead | "
            "loss clean -> spliced | transcoder gap |", "|---" * (len(langs) + 6) + "|"]
    for r in results:
        m = r.metrics
        rows.append(f"| {r.block} | {m['fve']:.3f} | {' | '.join(f'{r.fve_lang[x]:.3f}' for x in langs)} | "
                    f"{m['l0']:.1f} | {m['dead']:.2f} | {m['loss_clean']:.2f} -> {m['loss_spliced']:.2f} | "
                    f"{gaps[r.block]:+.3f} |")
    return "\n".join(rows) + "\n"


def log_transcoders(run: RunRef, info: ModelInfo, results: list[TranscoderLayerResult]) -> dict[int, float]:
    """Per block (step = block): held-out quality `multilingual.transcoder.{fve, l0, dead, loss_clean,
    loss_spliced}`, `multilingual.transcoder.fve.<lang>`, overlaps under `multilingual.transcoder.overlap.*`; the
    overlap figure. Returns the gap per block."""
    for r in results:
        tracking.log_metrics(run, {**{f"multilingual.transcoder.{k}": r.metrics[k] for k in TRANSCODER_METRICS},
                                   **{f"multilingual.transcoder.fve.{lang}": v for lang, v in r.fve_lang.items()}},
                             step=r.block)
    per_block = {r.block: r.overlap for r in results}
    gaps = log_overlaps(run, "multilingual.transcoder.overlap", per_block)
    tracking.log_figure(run, overlap_figure(per_block, f"{info.name}: transcoder features (block)"),
                        "plots/multilingual_overlap_transcoder.png")
    return gaps


def log_feature_pages(run: RunRef, pages: list[LayerPages], model: str) -> int:
    """The feature pages as artifacts (`features/index.html`, `features/layer_LL/feature_NNNNN.html`: the layout
    attribution graphs link to; their data as `features/pages.json`, what `lensflow feature` reads) and, per layer
    (step = layer), how many features have a page of each kind and the fraction never active on the measured
    paragraphs. Returns the number of pages."""
    if not pages:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        write_site(pages, tmp, model)
        Path(tmp, DATA).write_text(json.dumps([asdict(lp) for lp in pages]), encoding="utf-8")
        run.client.log_artifacts(run.run_id, str(Path(tmp, "features")), "features")
    for lp in pages:
        kinds = [p.kind.split(":")[0] for p in lp.pages]
        tracking.log_metrics(run, {"multilingual.pages.multilingual": kinds.count("multilingual"),
                                   "multilingual.pages.specific": kinds.count("specific"),
                                   "multilingual.pages.dead": lp.dead}, step=lp.layer)
    return sum(len(lp.pages) for lp in pages)


def log_results(run: RunRef, info: ModelInfo, stores: dict[str, Extraction], results: list[SAELayerResult],
                neurons: NeuronOverlaps | None, inputs: MultilingualInputs, t0: float,
                pages: list[LayerPages] | None = None, tc: list[TranscoderLayerResult] | None = None) -> Summary:
    """Log every per-layer metric, the figures and the table; the summary counts what this run computed, over the
    stores ({label: extraction}) too. `t0` is the flow's start (perf_counter) for wall_s."""
    by_layer = {r.layer: r for r in results}
    for l, r in by_layer.items():
        tracking.log_metrics(run, {"multilingual.sae.fve": r.sae.fve, "multilingual.sae.l0": r.sae.l0,
                                   "multilingual.sae.dead": r.sae.dead,
                                   **{f"multilingual.sae.fve.{lang}": v for lang, v in r.fve_lang.items()}}, step=l)
    tracking.measures(run, MEASURES)
    trained = log_sae_training(run, [r for r in by_layer.values() if r.trained], stores["multilingual-general"].url)
    tracking.set_tags(run, {f"multilingual.sae.layer_{l:02d}": child for l, child in trained.items()})
    sae_overlaps = {l: r.overlap for l, r in by_layer.items()}
    gaps = log_overlaps(run, "multilingual.overlap", sae_overlaps)
    ngaps = log_overlaps(run, "multilingual.neurons.overlap", neurons.blocks) if neurons else {}
    tracking.log_figure(run, overlap_figure(sae_overlaps, f"{info.name}: SAE features (resid layer)"),
                        "plots/multilingual_overlap_sae.png")
    if neurons:
        tracking.log_figure(run, overlap_figure(neurons.blocks, f"{info.name}: MLP neurons (block)"),
                            "plots/multilingual_overlap_neurons.png")
    langs = list(results[0].fve_lang)
    fve = {"held-out general text": {l: r.sae.fve for l, r in by_layer.items()},
           **{lang: {l: r.fve_lang[lang] for l, r in by_layer.items()} for lang in langs}}
    tracking.log_figure(run, layer_curves({"SAE reconstruction": fve}, "fraction of variance explained",
                                          f"{info.name}: SAE quality"), "plots/multilingual_sae_fve.png")
    text = table(by_layer, gaps, ngaps)
    tracking.log_text(run, text, "multilingual.md")
    n_pages = log_feature_pages(run, pages or [], info.name)
    tc = tc or []
    tc_gaps = log_transcoders(run, info, tc) if tc else {}
    tc_text = transcoder_table(tc, tc_gaps) if tc else ""
    if tc_text:
        tracking.log_text(run, tc_text, "multilingual_transcoders.md")
    tc_peak = max(tc_gaps, key=tc_gaps.get) if tc_gaps else None
    peak = max(gaps, key=gaps.get)
    npeak = max(ngaps, key=ngaps.get) if ngaps else None
    summary = Summary(
        list(by_layer), inputs.n_paragraphs, inputs.train_rows, gaps, ngaps, fve["held-out general text"],
        {x: fve[x] for x in langs},
        {l: r.sae.l0 for l, r in by_layer.items()}, sae_overlaps[peak].pairs,
        neurons.blocks[npeak].pairs if npeak is not None else {},
        [l for l, r in by_layer.items() if r.trained], [l for l, r in by_layer.items() if r.measured],
        neurons.computed if neurons else 0, sum(ex.chunks_computed for ex in stores.values()), time.perf_counter() - t0,
        text, n_pages, tc_gaps, {r.block: {k: r.metrics[k] for k in TRANSCODER_METRICS} for r in tc},
        {lang: {r.block: r.fve_lang[lang] for r in tc} for lang in (tc[0].fve_lang if tc else {})},
        next(r.overlap.pairs for r in tc if r.block == tc_peak) if tc else {}, tc_text)
    tracking.log_metrics(run, {"multilingual.peak_layer": summary.peak_layer,
                               "multilingual.neurons.peak_block": summary.neurons_peak_block,
                               "multilingual.paragraphs": inputs.n_paragraphs,
                               "multilingual.sae.train_paragraphs": len(inputs.train_rows),
                               "multilingual.wall_s": summary.wall_s})
    return summary
