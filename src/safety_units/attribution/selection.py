"""Unit selections: which units a `freeze=` strategy trains around and which units `ablate=` zeroes.

Both read the same settings -- a unit map (fingerprint-checked against the model), whole classes, a random set as
large as a class (`random_like`, `seed`, `match`), or a share of each unit kind -- and return a Selection
({group key: bool per unit}) plus a description that is logged and exported with it. safety_units.units.masking turns a
selection into exact gradient masks (freezing) or zeroes it (ablation).
"""

from __future__ import annotations

from torch import nn

from safety_units.attribution.pipeline import cached_attribution
from safety_units.units.classification import CLASS_CODES
from safety_units.utils.errors import ConfigError
from safety_units.units.unit_map import Selection, UnitMap, load_selection, random_units, selection_size, share_counts
from safety_units.units.groups import resolve_units

TOPS = ("safety_minus_utility", "safety", "utility", "random")


def class_list(value) -> list[str]:
    """A class setting as a list: `esu`, `[esu, cu]` or empty."""
    value = value or []
    return [value] if isinstance(value, str) else list(value)


def load_checked(path, model: nn.Module, settings, names: dict | None) -> UnitMap:
    """The unit map at `path`, checked against `model` unless `settings.strict_fingerprint` is false."""
    return UnitMap.load(path, model=model, strict=settings.get("strict_fingerprint", True), names=names)


def random_like(um: UnitMap, selection: Selection, settings) -> Selection:
    """A seeded random set as large as `selection` (settings.seed; settings.match: per kind or per layer)."""
    return um.random_like(selection, seed=int(settings.get("seed", 0)), match=settings.get("match", "kind"))


def random_share(sizes: dict[str, int], share, seed: int, key: str) -> Selection:
    """round(share * units) units of each kind, drawn with `seed` (`key` names the share in errors)."""
    return random_units(sizes, share_counts(sizes, share, key), seed)


# --------------------------------------------------------------------------- freeze=
def _freeze_map(cfg, model: nn.Module, tokenizer, names: dict | None) -> UnitMap:
    f = cfg.freeze
    path = f.get("unit_map")
    if not path:
        if not f.get("auto_attribute", False):
            raise ConfigError(
                f"freeze={f.strategy} needs a unit map: run `python attribute.py model=...` and pass "
                f"freeze.unit_map=<run dir>/unit_map.safetensors (or set freeze.auto_attribute=true).")
        path = str(cached_attribution(cfg, model, tokenizer))
    return load_checked(path, model, f, names)


def _train_only_classes(f) -> list[str]:
    classes = class_list(f.get("classes"))
    bad = [c for c in classes if str(c).lower() not in CLASS_CODES]
    if bad:
        raise ConfigError(f"freeze.classes: unknown unit class(es) {bad}; use any of {sorted(CLASS_CODES)}.")
    if bool(classes) == (f.get("random_share") is not None):
        raise ConfigError("freeze=train_only needs exactly one of freeze.classes=[esu, ...] (units of a unit map) "
                          "and freeze.random_share=0.02 (a seeded random set, freeze.seed; no map needed).")
    return [str(c).lower() for c in classes]


def freeze_selection(cfg, model: nn.Module, tokenizer, names: dict | None,
                     description: dict) -> tuple[Selection, str, UnitMap | None]:
    """(selection, mask mode, the unit map or None) of a unit strategy of cfg.freeze; fills `description`."""
    f = cfg.freeze
    strategy = f.strategy
    if strategy == "train_only":
        classes = _train_only_classes(f)
        if not classes:  # a planted set: no map involved
            seed = int(f.get("seed", 0))
            sizes = {g.key: g.n for g in resolve_units(model, names)}
            description.update(random_share=float(f.random_share), seed=seed)
            return random_share(sizes, f.random_share, seed, "freeze.random_share"), "train_only", None
        um = _freeze_map(cfg, model, tokenizer, names)
        description["classes"] = classes
        return um.select(classes), "train_only", um
    um = _freeze_map(cfg, model, tokenizer, names)
    base = f.get("like") if strategy == "random" else strategy
    if base not in ("esu", "esu_cu", "ru_only"):
        raise ConfigError(f"freeze.like must be esu, esu_cu or ru_only, got {base!r}.")
    if base == "esu":
        selection = um.select("esu")
    elif base == "esu_cu":
        share = float(f.get("total_share", 0.075))
        if not 0.0 < share < 1.0:
            raise ConfigError(f"freeze.total_share must be in (0, 1), got {share}.")
        selection = um.esu_plus_top_cu(share)
    else:
        selection = um.select("ru")
    if strategy == "random":
        selection = random_like(um, selection, f)
        description["like"] = base
    return selection, "train_only" if base == "ru_only" else "freeze", um


# --------------------------------------------------------------------------- ablate=
def ablation_selection(cfg, model: nn.Module, names: dict | None) -> tuple[Selection | None, dict | None]:
    """The units to zero for cfg.ablate (None when no ablation is asked for), plus a description.

    One of: ablate.classes (whole classes), ablate.random_like (a random set as large as a class), or ablate.top
    with ablate.share (per unit kind, the round(share * units) units ranked highest by safety_minus_utility,
    safety or utility percentile rank -- UnitMap.top -- or, top=random, drawn at random with ablate.seed)."""
    a = cfg.get("ablate")
    if a is None:
        return None, None
    classes = class_list(a.get("classes"))
    top = a.get("top")
    asked = [k for k, v in (("classes", classes), ("random_like", a.get("random_like")), ("top", top),
                            ("selection", a.get("selection"))) if v]
    if a.get("share") is not None and not top:
        raise ConfigError("ablate.share needs ablate.top=safety_minus_utility|safety|utility|random.")
    if not a.get("unit_map"):
        if asked:
            raise ConfigError(f"ablate.{asked[0]} needs ablate.unit_map=<unit_map.safetensors>.")
        return None, None
    if len(asked) != 1:
        raise ConfigError("set exactly one of ablate.classes (e.g. [esu]), ablate.random_like (e.g. esu), "
                          "ablate.top (with ablate.share) and ablate.selection (a saved unit set).")
    um = load_checked(a.unit_map, model, a, names)
    seed, match = int(a.get("seed", 0)), a.get("match", "kind")
    if classes:
        sel, what = um.select(classes), {"classes": classes}
    elif a.get("selection"):
        sel, _ = load_selection(a.selection)
        sizes = {k: v.numel() for k, v in sel.items()}
        if sizes != um.sizes():
            raise ConfigError(f"ablate.selection={a.selection}: its units {sizes} are not those of the unit map "
                              f"{a.unit_map} ({um.sizes()}).")
        what = {"selection": str(a.selection)}
    elif a.get("random_like"):
        sel = random_like(um, um.select(a.random_like), a)
        what = {"random_like": a.random_like, "seed": seed, "match": match}
    else:
        if top not in TOPS:
            raise ConfigError(f"ablate.top must be one of {TOPS}, got {top!r}.")
        if top == "random":
            if match != "kind":
                raise ConfigError("ablate.top=random draws its share per unit kind; ablate.match=layer applies to "
                                  "ablate.random_like only.")
            sel = random_share(um.sizes(), a.get("share"), seed, "ablate.share")
        else:
            sel = um.top(top, share_counts(um.sizes(), a.get("share"), "ablate.share"))
        what = {"top": top, "share": float(a.share), "seed": seed if top == "random" else None,
                "normalization": um.metadata.get("normalization", "per_layer")}
    what["units"] = selection_size(sel)
    what["unit_map"] = str(a.unit_map)
    return sel, what


def ablation_label(ablation: dict) -> str:
    """How a report names an ablation (eval.md header, the study's tables)."""
    if ablation.get("classes"):
        return f"classes {ablation['classes']}"
    if ablation.get("selection"):
        return f"the units of {ablation['selection']}"
    if ablation.get("random_like"):
        return f"random like {ablation['random_like']} (seed {ablation['seed']})"
    if ablation["top"] == "random":
        return f"random {ablation['share']:.2%} of units (seed {ablation['seed']})"
    return f"top {ablation['share']:.2%} of units by {ablation['top']}"
