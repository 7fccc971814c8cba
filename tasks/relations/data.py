"""Relations in the format of Hernandez et al.'s data release: one JSON file per relation,
`{"name", "prompt_templates": ["{} plays the"], "samples": [{"subject", "object"}]}` (other keys ignored, the kind
read from `properties.relation_type` when present). A user points `lre.relations` at a folder of such files (the
paper's own, or theirs) or at one file."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from lensflow.tasks.core.config import ConfigError
from lensflow.tasks.data import DATA_DIR

RELATIONS_DIR = DATA_DIR / "relations"
KINDS = ("factual", "commonsense", "linguistic", "bias")


@dataclass(frozen=True)
class Sample:
    subject: str
    object: str


@dataclass(frozen=True)
class Relation:
    name: str
    kind: str  # factual / commonsense / linguistic / bias, or "other"
    template: str  # the first prompt template; "{}" is the subject
    samples: tuple[Sample, ...]
    source: str  # the file it came from (error messages)

    def prompt(self, subject: str) -> str:
        return self.template.replace("{}", subject)

    def demo(self, sample: Sample) -> str:
        return f"{self.prompt(sample.subject)} {sample.object}"


def _load_file(path: Path) -> Relation:
    name = f"lre.relations {path}"
    try:
        row = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}: cannot be read ({type(exc).__name__})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{name}: line {exc.lineno}: not JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise ConfigError(f"{name}: not a JSON object")
    templates, samples = row.get("prompt_templates"), row.get("samples")
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
        raise ConfigError(f'{name}: key "prompt_templates" must be a non-empty list of strings')
    for i, t in enumerate(templates):
        if t.count("{}") != 1:
            raise ConfigError(f'{name}: key "prompt_templates"[{i}] {t!r} must hold "{{}}" (the subject) once')
    if not isinstance(samples, list) or not samples:
        raise ConfigError(f'{name}: key "samples" must be a non-empty list of {{"subject", "object"}}')
    out: dict[Sample, None] = {}
    for i, s in enumerate(samples):
        if not (isinstance(s, dict) and isinstance(s.get("subject"), str) and isinstance(s.get("object"), str)
                and s["subject"].strip() and s["object"].strip()):
            raise ConfigError(f'{name}: key "samples"[{i}] must be {{"subject": str, "object": str}}, non-empty')
        out[Sample(s["subject"].strip(), s["object"].strip())] = None
    kind = str((row.get("properties") or {}).get("relation_type", "other"))
    return Relation(str(row.get("name") or path.stem), kind if kind in KINDS else "other", templates[0].strip(),
                    tuple(out), str(path))


def load_relations(source: str | None = None) -> list[Relation]:
    """Every relation file of a folder (sorted by name), or one file; one ConfigError line naming the file/key."""
    path = RELATIONS_DIR if source is None else Path(source)
    if not path.exists():
        raise ConfigError(f"lre.relations {path}: not found")
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise ConfigError(f"lre.relations {path}: no *.json relation files")
    rels = [_load_file(f) for f in files]
    seen: dict[str, str] = {}
    for r in rels:
        if r.name in seen:
            raise ConfigError(f"lre.relations {r.source}: relation name {r.name!r} also in {seen[r.name]}")
        seen[r.name] = r.source
    return rels


def select_relations(rels: list[Relation], only: list[str] | None, max_relations: int | None) -> list[Relation]:
    """The named relations (unknown names are an error), else at most max_relations taken round-robin over kinds,
    so a capped demo still shows every kind."""
    if only:
        by_name = {r.name: r for r in rels}
        missing = [n for n in only if n not in by_name]
        if missing:
            raise ConfigError(f"lre.only: {missing} not among the relations ({', '.join(sorted(by_name))})")
        return [by_name[n] for n in only]
    queues = [[r for r in rels if r.kind == k] for k in (*KINDS, "other")]
    out: list[Relation] = []
    while any(queues) and (max_relations is None or len(out) < max_relations):
        for q in queues:
            if q and (max_relations is None or len(out) < max_relations):
                out.append(q.pop(0))
    return out


@dataclass(frozen=True)
class Split:
    """Disjoint samples: `train` gives the Jacobians and the in-context demos, `dev` chooses beta, rank and layer,
    `test` is only ever scored."""

    train: tuple[Sample, ...]
    dev: tuple[Sample, ...]
    test: tuple[Sample, ...]


def split(rel: Relation, n_train: int, n_dev: int, max_test: int | None, seed: int) -> Split:
    samples = list(rel.samples)
    random.Random(f"{seed}:{rel.name}").shuffle(samples)
    if len(samples) < n_train + n_dev + 2:
        raise ConfigError(f"lre.relations {rel.source}: {len(samples)} samples; lre.n_train={n_train} + lre.n_dev="
                          f"{n_dev} + 2 test subjects are needed")
    test = samples[n_train + n_dev:]
    return Split(tuple(samples[:n_train]), tuple(samples[n_train:n_train + n_dev]),
                 tuple(test[:max_test] if max_test else test))
