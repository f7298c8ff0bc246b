"""The unit map: per-unit safety/utility scores and classes, bound to the model it was computed on.

Files (one run directory):
    unit_map.safetensors   tensors `{kind}.{layer}.safety|utility` (float32) and `.class` (uint8);
                           metadata: class codes, scoring method and data, normalisation, model fingerprint
    unit_map.json          human summary: counts and shares per class, per layer and in total
    units_per_layer.png    stacked bars of classes per layer (MLP and attention)

A *selection* is a dict {"mlp.3": BoolTensor[n_units], ...} of units; masking and ablation take selections.
`save_selection` / `load_selection` store one (e.g. `trained_units.safetensors` beside an exported model).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from safety_units.units.classification import CLASS_CODES, normalise
from safety_units.utils.errors import ConfigError, UnitMapError
from safety_units.utils.fingerprints import model_fingerprint
from safety_units.utils.ranks import RankedLogger
from safety_units.units.groups import KINDS, resolve_units, unit_counts
from safety_units.units.layouts import has_heads, with_heads

log = RankedLogger(__name__)

Selection = dict[str, torch.Tensor]
FORMAT_VERSION = "1"
RANKINGS = ("safety_minus_utility", "safety", "utility")


def full_fingerprint(model, names: dict | None = None) -> dict:
    fp = model_fingerprint(model)
    fp["units"] = unit_counts(resolve_units(model, names))
    return fp


def _sort_keys(keys) -> list[str]:
    return sorted(keys, key=lambda k: (int(k.split(".")[1]), KINDS.index(k.split(".")[0])))


class UnitMap:
    def __init__(self, safety: dict[str, torch.Tensor], utility: dict[str, torch.Tensor],
                 classes: dict[str, torch.Tensor], metadata: dict):
        self.safety, self.utility, self.classes = safety, utility, classes
        self.metadata = metadata
        self.path: Path | None = None

    # ------------------------------------------------------------------ io
    def save(self, out_dir: str | Path, plot: bool = True) -> Path:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for k in _sort_keys(self.classes):
            tensors[f"{k}.safety"] = self.safety[k].float().contiguous()
            tensors[f"{k}.utility"] = self.utility[k].float().contiguous()
            tensors[f"{k}.class"] = self.classes[k].to(torch.uint8).contiguous()
        meta = {"format_version": FORMAT_VERSION, "class_codes": json.dumps(CLASS_CODES)}
        meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in self.metadata.items()})
        save_file(tensors, str(out / "unit_map.safetensors"), metadata=meta)
        (out / "unit_map.json").write_text(json.dumps(self.summary(), indent=2))
        if plot:
            from safety_units.utils.plots import plot_units_per_layer  # matplotlib only where a plot is drawn

            plot_units_per_layer(self, out / "units_per_layer.png")
        self.path = out / "unit_map.safetensors"
        return self.path

    @classmethod
    def load(cls, path: str | Path, model=None, strict: bool = True, names: dict | None = None) -> "UnitMap":
        """Load a map; with `model`, check that it was computed on this model (fingerprint)."""
        from safetensors import safe_open

        p = Path(path)
        if p.is_dir():
            p = p / "unit_map.safetensors"
        if not p.is_file():
            raise UnitMapError(f"unit map {p} does not exist; create one with `python attribute.py model=...`.")
        try:
            with safe_open(str(p), framework="pt") as f:
                raw_meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
            raise UnitMapError(f"{p} is not a readable unit map ({e}).") from None
        meta = {}
        for k, v in raw_meta.items():
            try:
                meta[k] = json.loads(v)
            except json.JSONDecodeError:
                meta[k] = v
        if "fingerprint" not in meta:
            raise UnitMapError(f"{p} has no model fingerprint in its metadata; it was not written by attribute.py.")
        safety, utility, classes = {}, {}, {}
        for k, t in tensors.items():
            base, field = k.rsplit(".", 1)
            {"safety": safety, "utility": utility, "class": classes}[field][base] = t
        meta.pop("format_version", None)
        meta.pop("class_codes", None)
        um = cls(safety, utility, classes, meta)
        um.path = p
        if model is not None:
            um.check_model(model, strict=strict, names=names)
        return um

    def check_model(self, model, strict: bool = True, names: dict | None = None) -> None:
        have = full_fingerprint(model, with_heads(names, has_heads(self.classes)))
        want = self.metadata["fingerprint"]
        fields = ["model_type", "num_layers", "units"] + (["weight_hash"] if strict else [])
        diff = [f for f in fields if have.get(f) != want.get(f)]
        if diff:
            details = "; ".join(f"{f}: map has {want.get(f)!r}, model has {have.get(f)!r}" for f in diff)
            raise UnitMapError(
                f"unit map {self.path} was computed on a different model ({details}). A unit map is only valid "
                f"for the exact weights it was attributed on: run `python attribute.py` on this model"
                + (", or pass strict=False / freeze.strict_fingerprint=false to accept a map of the same "
                   "architecture with different weights." if "weight_hash" in diff and len(diff) == 1 else ".")
            )

    # ------------------------------------------------------------------ summaries
    @property
    def keys(self) -> list[str]:
        return _sort_keys(self.classes)

    @property
    def kinds(self) -> list[str]:
        """The unit kinds of the map (from its keys, so maps written before `unit_kinds` was recorded answer too)."""
        return sorted({k.split(".")[0] for k in self.classes})

    def counts(self) -> dict:
        per = {}
        for k in self.keys:
            c = self.classes[k]
            per[k] = {name: int((c == code).sum()) for name, code in CLASS_CODES.items()} | {"total": c.numel()}
        return per

    def summary(self) -> dict:
        per = self.counts()
        out = {"metadata": {k: v for k, v in self.metadata.items()}, "per_layer": per, "total": {}}
        for kind in (*KINDS, "all"):
            rows = [v for k, v in per.items() if kind == "all" or k.startswith(kind + ".")]
            if not rows:
                continue
            tot = sum(r["total"] for r in rows)
            out["total"][kind] = {name: {"count": sum(r[name] for r in rows),
                                         "share": round(sum(r[name] for r in rows) / tot, 5)}
                                  for name in CLASS_CODES} | {"units": tot}
        return out

    # ------------------------------------------------------------------ selections
    def select(self, classes: list[str] | str) -> Selection:
        classes = [classes] if isinstance(classes, str) else list(classes)
        bad = [c for c in classes if c.lower() not in CLASS_CODES]
        if bad:
            raise UnitMapError(f"unknown unit class(es) {bad}; use {sorted(CLASS_CODES)}.")
        codes = [CLASS_CODES[c.lower()] for c in classes]
        return {k: torch.isin(self.classes[k], torch.tensor(codes, dtype=torch.uint8)) for k in self.keys}

    def safety_ranks(self) -> dict[str, torch.Tensor]:
        return normalise(self.safety, self.metadata.get("normalization", "per_layer"))

    def sizes(self) -> dict[str, int]:
        return {k: self.classes[k].numel() for k in self.keys}

    def top(self, by: str, counts: dict[str, int]) -> Selection:
        """The counts[kind] units of each kind ranked highest `by` one of RANKINGS.

        Ranks are the percentile ranks the classifier uses (the map's normalisation: within each layer or over all
        layers of a kind); safety_minus_utility is the ESU criterion without its safety-rank floor. Ties go to the
        higher safety rank (by=safety_minus_utility) or the lower other rank (by=safety / utility), then to the lower
        position (layer, channel)."""
        if by not in RANKINGS:
            raise ConfigError(f"rank units by one of {RANKINGS}, got {by!r}.")
        mode = self.metadata.get("normalization", "per_layer")
        rs, ru = normalise(self.safety, mode), normalise(self.utility, mode)
        out = {k: torch.zeros(self.classes[k].numel(), dtype=torch.bool) for k in self.keys}
        for kind, want in counts.items():
            keys = [k for k in self.keys if k.startswith(kind + ".")]
            s = torch.cat([rs[k] for k in keys]).numpy()
            u = torch.cat([ru[k] for k in keys]).numpy()
            primary, secondary = {"safety_minus_utility": (s - u, s), "safety": (s, -u), "utility": (u, -s)}[by]
            order = np.lexsort((np.arange(s.size), -secondary, -primary))  # last key sorts first
            flat = torch.zeros(s.size, dtype=torch.bool)
            flat[torch.from_numpy(order[:want].copy())] = True
            for k, part in zip(keys, torch.split(flat, [self.classes[k].numel() for k in keys])):
                out[k] = part.clone()
        return out

    def esu_plus_top_cu(self, total_share: float) -> Selection:
        """ESU plus the CU units with the highest (normalised) safety score, so that `total_share` of the units
        of each kind are selected (the paper freezes ESU + top CU = 7.5%)."""
        if not 0.0 < total_share < 1.0:
            raise UnitMapError(f"freeze.total_share must be in (0, 1), got {total_share}.")
        sel = self.select("esu")
        ranks = self.safety_ranks()
        for kind in sorted({k.split(".")[0] for k in self.keys}):
            keys = [k for k in self.keys if k.startswith(kind + ".")]
            n_total = sum(self.classes[k].numel() for k in keys)
            need = int(round(total_share * n_total)) - sum(int(sel[k].sum()) for k in keys)
            if need < 0:
                log.warning("%s: ESU alone (%d units) exceed total_share=%.3f; freezing ESU only", kind,
                            sum(int(sel[k].sum()) for k in keys), total_share)
                continue
            cand = [(float(ranks[k][j]), -li, -j, k, j) for li, k in enumerate(keys)
                    for j in torch.nonzero(self.classes[k] == CLASS_CODES["cu"]).flatten().tolist()]
            cand.sort(reverse=True)
            for *_, k, j in cand[:need]:
                sel[k][j] = True
        return sel

    def random_like(self, selection: Selection, seed: int = 0, match: str = "kind") -> Selection:
        """A seeded random selection with as many units as `selection`: per kind (default) or per layer."""
        if match == "layer":
            g = torch.Generator().manual_seed(int(seed))
            out = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in selection.items()}
            for k, v in selection.items():
                out[k][torch.randperm(v.numel(), generator=g)[: int(v.sum())]] = True
            return out
        if match != "kind":
            raise UnitMapError(f"random match must be 'kind' or 'layer', got {match!r}.")
        counts = {kind: n["units"] for kind, n in selection_size(selection).items()}
        return random_units({k: v.numel() for k, v in selection.items()}, counts, seed)


def _kinds(keys) -> list[str]:
    return sorted({k.split(".")[0] for k in keys})


def share_counts(sizes: dict[str, int], share, key: str) -> dict[str, int]:
    """round(share * units of the kind) for each unit kind; `key` names the config key in errors."""
    if share is None or isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < share < 1.0:
        raise ConfigError(f"{key} must be a share of units in (0, 1), e.g. 0.02, got {share!r}.")
    totals = {kind: sum(n for k, n in sizes.items() if k.startswith(kind + ".")) for kind in _kinds(sizes)}
    counts = {kind: int(round(share * n)) for kind, n in totals.items()}
    if not any(counts.values()):
        raise ConfigError(f"{key}={share} selects no unit (units per kind: {totals}); use a larger share.")
    return counts


def random_units(sizes: dict[str, int], counts: dict[str, int], seed: int = 0) -> Selection:
    """counts[kind] units of each kind, drawn uniformly over all layers of that kind (seeded)."""
    g = torch.Generator().manual_seed(int(seed))
    out = {k: torch.zeros(n, dtype=torch.bool) for k, n in sizes.items()}
    for kind in _kinds(sizes):
        keys = [k for k in _sort_keys(sizes) if k.startswith(kind + ".")]
        n = [sizes[k] for k in keys]
        flat = torch.zeros(sum(n), dtype=torch.bool)
        flat[torch.randperm(sum(n), generator=g)[: counts.get(kind, 0)]] = True
        for k, part in zip(keys, torch.split(flat, n)):
            out[k] = part.clone()
    return out


def selection_size(sel: Selection) -> dict:
    out = {}
    for kind in sorted({k.split(".")[0] for k in sel}):
        keys = [k for k in sel if k.startswith(kind + ".")]
        n = sum(int(sel[k].sum()) for k in keys)
        tot = sum(sel[k].numel() for k in keys)
        out[kind] = {"units": n, "of": tot, "share": round(n / tot, 5) if tot else 0.0}
    return out


def save_selection(sel: Selection, path: str | Path, metadata: dict | None = None) -> Path:
    """Store a selection as bool tensors per key, with JSON metadata (what it is, how it was drawn)."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    save_file({k: sel[k].bool().contiguous() for k in _sort_keys(sel)}, str(path), metadata=meta)
    return path


def load_selection(path: str | Path) -> tuple[Selection, dict]:
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise UnitMapError(f"unit selection {p} does not exist.")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            sel = {k: f.get_tensor(k).bool() for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise UnitMapError(f"{p} is not a readable unit selection ({e}).") from None
    return sel, meta
