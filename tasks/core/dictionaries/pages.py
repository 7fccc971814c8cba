"""Feature pages: what a dictionary feature responds to and what it writes, as self-contained HTML people can read.

Shared by every experiment that reads a model through a dictionary (multilingual overlap, circuits), so the artifact
layout is fixed here and nowhere else: `features/index.html` and one page per feature at
`features/layer_{LL:02d}/feature_{id:05d}.html` (`page_path`); an attribution graph links its nodes there.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lensflow.tasks.core.models import LM
from lensflow.tasks.core.progress import progress
from lensflow.tasks.core.store import Activations

ROOT = "features"  # the artifact folder every page lives under
INDEX = f"{ROOT}/index.html"


def page_path(layer: int, feature: int, root: str = ROOT) -> str:
    """A feature's page relative to the run's artifact root: `features/layer_05/feature_00042.html` (`root`: another
    dictionary's folder, e.g. the circuits transcoders' `transcoders/`, so two dictionaries' pages never collide)."""
    return f"{root}/layer_{layer:02d}/feature_{feature:05d}.html"


def page_href(layer: int, feature: int, from_page: str = INDEX) -> str:
    """The relative link to a feature's page from another page of the layout (the index, or a feature page)."""
    depth = from_page.count("/") - ROOT.count("/") - 1  # folders below `features/` the linking page sits in
    return "../" * depth + page_path(layer, feature).removeprefix(f"{ROOT}/")


@dataclass(frozen=True)
class Context:
    """One text around a feature's strongest token in it: the tokens shown, each one's activation, and which one
    peaked (`peak`, an index into `tokens`)."""

    source: str  # the text's language (or store label)
    row: int  # the text's row in its store
    position: int  # the peak token's position in the text
    value: float  # the feature's activation there
    tokens: list[str]
    acts: list[float]
    peak: int


@dataclass(frozen=True)
class LanguageProfile:
    """How a feature fires on one language's texts: over every real token of them."""

    tokens: int  # real tokens seen
    firing_rate: float  # fraction of those tokens where the feature is active
    mean_activation: float  # mean activation over all of those tokens (zeros included)
    mass_share: float  # this language's share of the feature's total activation mass (a per-token rate, see below)


@dataclass(frozen=True)
class FeaturePage:
    layer: int
    feature: int
    kind: str  # "multilingual", "specific:<lang>" or "dense": which list of the index it is in
    density: float  # fraction of all real tokens (every language) where it is active
    profile: dict[str, LanguageProfile]
    contexts: list[Context]
    top_tokens: list[tuple[str, float]]  # promoted through decoder x unembedding (logit effect), highest first
    bottom_tokens: list[tuple[str, float]] = field(default_factory=list)  # suppressed, lowest first


@dataclass(frozen=True)
class LayerPages:
    """The pages of one layer's dictionary: which features were chosen and their data."""

    layer: int
    dictionary: str  # "sae", "transcoder", ...: what the index says the features belong to
    width: int
    dead: float  # fraction of features never active on the texts
    pages: list[FeaturePage]


# ---------------------------------------------------------------- gathering: typed, testable without Ray or MLflow


@dataclass(frozen=True)
class TextCodes:
    """One source of texts (a language's paragraphs) as a dictionary sees them: token ids [n, T] (-1 = padding) and
    `codes(rows)`, the dense codes [len(rows), T, width] of those rows (anything at padding is ignored)."""

    token_ids: np.ndarray
    codes: Callable[[np.ndarray], torch.Tensor]
    skip_first: bool = True  # the BOS / attention-sink position is never a context nor counted

    def mask(self, rows: np.ndarray) -> torch.Tensor:
        m = torch.from_numpy(np.asarray(self.token_ids[rows]) >= 0)
        if self.skip_first:
            m[:, 0] = False
        return m


def store_codes(encode: Callable[[torch.Tensor], torch.Tensor], acts: Activations, layer: int, site: str = "resid",
                skip_first: bool = True) -> TextCodes:
    """A stored layer or block (positions=all) as a dictionary's dense codes, read a contiguous block of rows at a
    time: `encode` is an SAE's on `resid`, a transcoder's on `mlp_in` (its decoder directions then add to mlp_out)."""
    def codes(rows: np.ndarray) -> torch.Tensor:
        lo, hi = int(rows.min()), int(rows.max()) + 1
        with torch.no_grad():
            return encode(torch.from_numpy(acts.layer(layer, slice(lo, hi), site=site)))[torch.as_tensor(rows - lo)]

    return TextCodes(np.asarray(acts.token_ids[:]), codes, skip_first)


@dataclass
class FeatureStats:
    """Per source and feature, over every real token: counts, active tokens and activation sums; and for every
    feature its `top` strongest texts (one per text: the text's maximum) as (value, source index, row, position)."""

    sources: list[str]
    tokens: np.ndarray  # [S]
    fired: np.ndarray  # [S, F]
    mass: np.ndarray  # [S, F]
    top_value: torch.Tensor  # [n, F], descending; -inf where fewer than n texts
    top_source: torch.Tensor  # [n, F]
    top_row: torch.Tensor  # [n, F]
    top_pos: torch.Tensor  # [n, F]

    @property
    def width(self) -> int:
        return self.fired.shape[1]

    def rate(self) -> np.ndarray:
        """[S, F] firing rate per source."""
        return self.fired / np.maximum(self.tokens, 1)[:, None]

    def density(self) -> np.ndarray:
        return self.fired.sum(0) / max(int(self.tokens.sum()), 1)

    def profile(self, f: int) -> dict[str, LanguageProfile]:
        """Mass share is over per-token means, so a source with more tokens does not look more important."""
        means = self.mass[:, f] / np.maximum(self.tokens, 1)
        total = float(means.sum())
        return {s: LanguageProfile(int(self.tokens[i]), float(self.rate()[i, f]), float(means[i]),
                                   float(means[i] / total) if total > 0 else 0.0) for i, s in enumerate(self.sources)}


@torch.no_grad()
def feature_stats(sources: Mapping[str, TextCodes], top_n: int, batch_rows: int = 16,
                  desc: str = "feature stats") -> FeatureStats:
    """One pass over every source's texts: density and language profile counts, and each feature's `top_n`
    strongest texts (by the text's maximum activation, at most one context per text)."""
    names = list(sources)
    tokens, fired, mass = [], [], []
    top = None  # (values, source, row, pos) each [<= top_n, F]
    total = sum(len(s.token_ids) for s in sources.values())
    with progress(total, desc) as bar:
        for si, name in enumerate(names):
            src = sources[name]
            n_tok, f_sum, m_sum = 0, None, None
            for lo in range(0, len(src.token_ids), batch_rows):
                rows = np.arange(lo, min(lo + batch_rows, len(src.token_ids)))
                z = src.codes(rows).float().cpu()
                m = src.mask(rows)[:, :z.shape[1]]
                z = torch.where(m[..., None], z, torch.zeros((), dtype=z.dtype))
                n_tok += int(m.sum())
                f_blk, m_blk = (z > 0).sum((0, 1)).double(), z.sum((0, 1)).double()
                f_sum = f_blk if f_sum is None else f_sum + f_blk
                m_sum = m_blk if m_sum is None else m_sum + m_blk
                zmax, pos = torch.where(m[..., None], z, torch.full((), -float("inf"))).max(1)  # [rows, F]
                cand = (zmax, torch.full_like(pos, si), torch.from_numpy(rows)[:, None].expand_as(pos), pos)
                if top is not None:
                    cand = tuple(torch.cat([a, b]) for a, b in zip(top, cand))
                order = cand[0].topk(min(top_n, cand[0].shape[0]), dim=0).indices
                top = tuple(c.gather(0, order) for c in cand)
                bar.update(len(rows))
            tokens.append(n_tok)
            fired.append(f_sum.numpy())
            mass.append(m_sum.numpy())
    return FeatureStats(names, np.asarray(tokens), np.stack(fired), np.stack(mass), *top)


SPECIFIC_RATIO = 2.0  # a language's own feature fires at least this many times as often on it as on any other


def choose_features(stats: FeatureStats, multilingual: int, specific: int, min_density: float = 0.0) -> dict[int, str]:
    """Which features get pages, {feature: kind}, bounded: the `multilingual` features with the highest lowest
    firing rate over the sources (active in every language), then per source the `specific` ones firing most on it
    beyond their rate anywhere else, among those firing SPECIFIC_RATIO times as often on it as on any other (a
    language's own features). With one source: the densest features ("dense"). Features below `min_density` are
    never chosen."""
    rate, density = stats.rate(), stats.density()
    alive = density > max(min_density, 0.0)
    chosen: dict[int, str] = {}

    def take(score: np.ndarray, n: int, kind: str) -> None:
        ok = alive & (score > 0)
        for f in np.argsort(-np.where(ok, score, -np.inf), kind="stable"):
            if n <= 0 or not ok[f]:
                break
            if int(f) not in chosen:
                chosen[int(f)] = kind
                n -= 1

    if len(stats.sources) == 1:
        take(density, multilingual + specific, "dense")
        return chosen
    take(rate.min(0), multilingual, "multilingual")
    for i, s in enumerate(stats.sources):
        others = np.delete(rate, i, axis=0).max(0)
        take(np.where(rate[i] >= SPECIFIC_RATIO * others, rate[i] - others, 0.0), specific, f"specific:{s}")
    return chosen


def output_tokens(lm: LM, directions: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [F, 2k], logit effects [F, 2k]): each decoder direction's k most promoted then k most suppressed
    tokens, through the model's own final norm and unembedding (minus the norm's output for a zero input, so a
    LayerNorm bias does not rank tokens)."""
    with torch.no_grad():
        d = directions.to(lm.device, lm.dtype)
        logits = (lm.decode(d) - lm.decode(torch.zeros_like(d[:1]))).float()
        hi, lo = logits.topk(k, dim=-1), logits.topk(k, dim=-1, largest=False)
    return torch.cat([hi.indices, lo.indices], -1).cpu(), torch.cat([hi.values, lo.values], -1).cpu()


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Each token as the text it stands for (decoded alone; a piece of a multi-byte character shows as U+FFFD)."""
    return [tokenizer.decode([int(i)]) for i in ids]


@torch.no_grad()
def contexts(sources: Mapping[str, TextCodes], stats: FeatureStats, features: list[int], tokenizer,
             before: int = 12, after: int = 4) -> dict[int, list[Context]]:
    """For each chosen feature, its strongest texts as token windows around the peak, with the feature's activation
    at every shown token (recomputed per text, so each text is encoded once)."""
    want: dict[tuple[int, int], list[tuple[int, int, float]]] = {}  # (source, row) -> [(feature, pos, value)]
    for f in features:
        for v, s, r, p in zip(stats.top_value[:, f].tolist(), stats.top_source[:, f].tolist(),
                              stats.top_row[:, f].tolist(), stats.top_pos[:, f].tolist()):
            if v > 0:
                want.setdefault((s, r), []).append((f, p, v))
    out: dict[int, list[Context]] = {f: [] for f in features}
    for (s, r), hits in sorted(want.items()):
        name = stats.sources[s]
        src = sources[name]
        ids = np.asarray(src.token_ids[r])
        z = src.codes(np.asarray([r]))[0].float().cpu()
        n_real = int((ids >= 0).sum())
        for f, p, v in hits:
            lo, hi = max(0, p - before), min(n_real, p + after + 1)
            out[f].append(Context(name, int(r), int(p), float(v), token_strings(tokenizer, ids[lo:hi].tolist()),
                                  [float(a) for a in z[lo:hi, f]], int(p - lo)))
    return {f: sorted(c, key=lambda c: -c.value) for f, c in out.items()}


def layer_pages(lm: LM, sources: Mapping[str, TextCodes], directions: torch.Tensor, layer: int, dictionary: str,
                multilingual: int, specific: int, n_contexts: int, n_tokens: int, min_density: float = 0.0,
                before: int = 12, after: int = 4) -> LayerPages:
    """Everything one layer's pages show: statistics over the sources, the chosen features, their contexts and
    their output tokens (`directions`: the decoder rows [width, d_model] as they add to the residual stream)."""
    stats = feature_stats(sources, n_contexts, desc=f"feature pages layer {layer}")
    chosen = choose_features(stats, multilingual, specific, min_density)
    feats = list(chosen)
    ctx = contexts(sources, stats, feats, lm.tokenizer, before, after)
    density = stats.density()
    pages = []
    if feats:
        ids, vals = output_tokens(lm, directions[feats], n_tokens)
        for i, f in enumerate(feats):
            toks = token_strings(lm.tokenizer, ids[i].tolist())
            pairs = [(t, float(v)) for t, v in zip(toks, vals[i].tolist())]
            pages.append(FeaturePage(layer, f, chosen[f], float(density[f]), stats.profile(f), ctx[f],
                                     pairs[:n_tokens], pairs[n_tokens:]))
    return LayerPages(layer, dictionary, stats.width, float((stats.fired.sum(0) == 0).mean()), pages)


def from_dict(d: Mapping) -> LayerPages:
    """A LayerPages back from its JSON form (dataclasses.asdict), e.g. a stage item's metadata."""
    pages = [FeaturePage(p["layer"], p["feature"], p["kind"], p["density"],
                         {k: LanguageProfile(**v) for k, v in p["profile"].items()},
                         [Context(**c) for c in p["contexts"]], [tuple(t) for t in p["top_tokens"]],
                         [tuple(t) for t in p["bottom_tokens"]]) for p in d["pages"]]
    return LayerPages(d["layer"], d["dictionary"], d["width"], d["dead"], pages)


# ---------------------------------------------------------------- rendering: static HTML, no scripts or files from elsewhere

STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:70em;color:#222}
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.6em}table{border-collapse:collapse}
td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
.ctx{font-family:ui-monospace,monospace;white-space:pre-wrap;line-height:1.9}
.tok{border-radius:2px}.peak{outline:2px solid #c00}.bar{display:inline-block;height:.8em;background:#4a7}
.muted{color:#888}.num{text-align:right;font-variant-numeric:tabular-nums}input{font-size:1em;padding:3px;width:24em}"""


def _esc(text: str) -> str:
    return html.escape(text.replace("\n", "\u21b5"), quote=True)


def _tokens_html(tokens: list[tuple[str, float]]) -> str:
    return " ".join(f"<code>{_esc(t)}</code>&nbsp;<span class=muted>{v:+.2f}</span>" for t, v in tokens)


def _context_html(c: Context, vmax: float) -> str:
    spans = []
    for i, (t, a) in enumerate(zip(c.tokens, c.acts)):
        alpha = max(0.0, min(1.0, a / vmax)) if vmax > 0 else 0.0
        cls = "tok peak" if i == c.peak else "tok"
        spans.append(f'<span class="{cls}" style="background:rgba(230,120,20,{alpha:.2f})" '
                     f'title="{a:.3f}">{_esc(t)}</span>')
    return "".join(spans)


def _profile_rows(profile: Mapping[str, LanguageProfile]) -> str:
    top_rate = max((p.firing_rate for p in profile.values()), default=0.0) or 1.0
    return "".join(
        f"<tr><td>{_esc(lang)}</td><td class=num>{p.firing_rate:.4f}</td>"
        f"<td><span class=bar style='width:{8 * p.firing_rate / top_rate:.2f}em'></span></td>"
        f"<td class=num>{p.mean_activation:.4f}</td><td class=num>{p.mass_share:.3f}</td>"
        f"<td class=num>{p.tokens}</td></tr>" for lang, p in profile.items())


def render_page(page: FeaturePage, model: str, dictionary: str) -> str:
    """One feature's page: density, language profile, output tokens, top contexts (the peak token outlined, every
    token shaded by its activation, the value on hover)."""
    vmax = max((c.value for c in page.contexts), default=0.0)
    ctx = "".join(f"<tr><td class=num>{c.value:.3f}</td><td>{_esc(c.source)}</td><td class=num>{c.row}:{c.position}"
                  f"</td><td class=ctx>{_context_html(c, vmax)}</td></tr>" for c in page.contexts)
    title = f"{model} {dictionary} layer {page.layer} feature {page.feature}"
    back = "../index.html"
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{_esc(title)}</title><style>{STYLE}</style>"
            f"</head><body><p><a href='{back}'>all features</a></p><h1>{_esc(title)}</h1>"
            f"<p>{_esc(page.kind)}; active on {page.density:.4%} of tokens</p>"
            f"<h2>Language profile</h2><table><tr><th>language</th><th>firing rate</th><th></th>"
            f"<th>mean activation</th><th>share of activation</th><th>tokens</th></tr>{_profile_rows(page.profile)}"
            f"</table><h2>Output tokens (decoder direction through the unembedding)</h2>"
            f"<p>promoted: {_tokens_html(page.top_tokens)}</p><p>suppressed: {_tokens_html(page.bottom_tokens)}</p>"
            f"<h2>Top activating contexts</h2><table><tr><th>activation</th><th>language</th><th>text:token</th>"
            f"<th>context</th></tr>{ctx}</table></body></html>")


INDEX_SCRIPT = """<script>
function filt(){const q=document.getElementById('q').value.trim().toLowerCase();
for(const r of document.querySelectorAll('tr[data-s]')){r.style.display=!q||r.dataset.s.includes(q)?'':'none'}}
</script>"""


def render_index(layers: list[LayerPages], model: str) -> str:
    """Every page of every layer, multilingual and language-specific features listed apart, with a search box that
    matches a feature id (`L5:42`, `42`) or a token from its contexts or outputs."""
    sections = []
    for lp in layers:
        groups: dict[str, list[FeaturePage]] = {}
        for p in lp.pages:
            groups.setdefault("language-specific" if p.kind.startswith("specific:") else p.kind, []).append(p)
        body = [(f"<h2>Layer {lp.layer} ({_esc(lp.dictionary)}, {lp.width} features, {lp.dead:.1%} never active on "
                 "these texts)</h2>")]
        for kind, pages in groups.items():
            rows = []
            for p in pages:
                langs = " ".join(f"{k} {v.firing_rate:.3f}" for k, v in p.profile.items())
                words = {t for c in p.contexts for t in c.tokens} | {t for t, _ in p.top_tokens}
                search = _esc(f"l{p.layer}:{p.feature} {p.feature} " + " ".join(w.strip().lower() for w in words))
                rows.append(f"<tr data-s=\"{search}\"><td><a href='{page_href(p.layer, p.feature)}'>{p.feature}</a>"
                            f"</td><td>{_esc(p.kind)}</td><td class=num>{p.density:.4f}</td><td>{_esc(langs)}</td>"
                            f"<td>{_tokens_html(p.top_tokens[:5])}</td></tr>")
            body.append(f"<h3>{_esc(kind)} ({len(pages)})</h3><table><tr><th>feature</th><th>kind</th><th>density</th>"
                        f"<th>firing rate per language</th><th>top output tokens</th></tr>{''.join(rows)}</table>")
        sections.append("".join(body))
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{_esc(model)} features</title><style>{STYLE}"
            f"</style>{INDEX_SCRIPT}</head><body><h1>{_esc(model)}: dictionary features</h1>"
            "<p><input id=q placeholder='feature id (42, L5:42) or token' oninput='filt()'></p>"
            f"{''.join(sections)}</body></html>")


def write_site(layers: list[LayerPages], folder: str | Path, model: str, root: str = ROOT) -> list[Path]:
    """The index and every feature page under `folder` in the artifact layout (folder/features/..., or folder/<root>/
    for another dictionary's folder; the pages' links are relative, so they work under any root)."""
    base = Path(folder)
    written = []
    for lp in layers:
        for p in lp.pages:
            path = base / page_path(p.layer, p.feature, root)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(render_page(p, model, lp.dictionary), encoding="utf-8")
            written.append(path)
    index = base / root / "index.html"
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text(render_index(layers, model), encoding="utf-8")
    return [index, *written]


DATA = f"{ROOT}/pages.json"  # every layer's page data (dataclasses.asdict of each LayerPages), beside the HTML


def find_page(layers: list[LayerPages], layer: int, feature: int) -> FeaturePage | None:
    return next((p for lp in layers if lp.layer == layer for p in lp.pages if p.feature == feature), None)


def terminal_text(page: FeaturePage, contexts: int = 5) -> str:
    """A page for the terminal: density, language profile, output tokens, the top contexts with the peak in [[ ]]."""
    def ctx(c: Context) -> str:
        toks = [f"[[{t}]]" if i == c.peak else t for i, t in enumerate(c.tokens)]
        return "".join(toks).replace("\n", "\u21b5")

    profile = ", ".join(f"{k} {v.firing_rate:.4f}" for k, v in page.profile.items())
    lines = [f"layer {page.layer} feature {page.feature} ({page.kind}): active on {page.density:.4%} of tokens",
             f"firing rate per language: {profile}",
             "promotes: " + " ".join(repr(t) for t, _ in page.top_tokens),
             "suppresses: " + " ".join(repr(t) for t, _ in page.bottom_tokens),
             *[f"  {c.value:7.3f} {c.source} {c.row}:{c.position}  {ctx(c)}" for c in page.contexts[:contexts]]]
    return "\n".join(lines)
