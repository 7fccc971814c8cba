"""Supernodes: named groups of features, given by the user as YAML (`name: ["layer:id", ...]`), so the same group can
be named across prompts and languages. Checked against the transcoders before anything runs: a feature that does not
exist is one line naming the file, the group and the feature."""

from __future__ import annotations

from pathlib import Path

import yaml

from lensflow.tasks.core.config import ConfigError

Supernodes = dict[str, list[tuple[int, int]]]  # name -> [(layer, feature id)]


def load_supernodes(path: str | Path, n_layers: int, width: int) -> Supernodes:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"circuits.supernodes: file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of supernode names to lists of 'layer:id'")
    out: Supernodes = {}
    for name, members in raw.items():
        if not isinstance(members, list) or not members:
            raise ConfigError(f"{p}: supernode '{name}' must list features as 'layer:id'")
        out[str(name)] = []
        for m in members:
            try:
                layer, fid = (int(x) for x in str(m).split(":"))
            except ValueError:
                raise ConfigError(f"{p}: supernode '{name}': '{m}' is not 'layer:id'") from None
            if not 0 <= layer < n_layers or not 0 <= fid < width:
                raise ConfigError(f"{p}: supernode '{name}' names feature {layer}:{fid}, which does not exist "
                                  f"(layers 0..{n_layers - 1}, features 0..{width - 1})")
            out[str(name)].append((layer, fid))
    return out


def graph_members(supernodes: Supernodes, node_ids: list[str]) -> dict[str, list[str]]:
    """Each supernode's nodes in one graph: its features at every position where they are active and kept."""
    found: dict[str, list[str]] = {}
    for name, feats in supernodes.items():
        keys = {f"{l}_{f}_" for l, f in feats}
        members = [n for n in node_ids if any(n.startswith(k) for k in keys)]
        if members:
            found[name] = members
    return found
