"""Freezing strategies: which parameter entries a `freeze=` config leaves trainable (masks: safety_units.masking).

* esu, esu_cu: freeze ESU (+ the top CU by safety, freeze.total_share of units) of a unit map;
* ru_only: train only the RU units of a map;
* random: a seeded random unit set as large as freeze.like's selection, frozen or trained as that strategy does;
* train_only: train only freeze.classes of a map, or a seeded random freeze.random_share of each kind's units
  (a planted set, no map);
* layers: freeze whole decoder layers (freeze.layers, or freeze.layers_like=esu_cu: the contiguous middle layers
  with the closest number of entries).

"Train only" freezes everything outside the selected units: other units, embeddings, norms, q/k/v and lm_head.
"""

from __future__ import annotations

import logging

from torch import nn

from safety_units.classification import CLASS_CODES
from safety_units.errors import ConfigError
from safety_units.masking import Masker, PartialMask, count_entries, masks_from_selection
from safety_units.unit_map import Selection, UnitMap, random_units, selection_size, share_counts
from safety_units.units import resolve_units, unit_names

log = logging.getLogger(__name__)

STRATEGIES = ("none", "esu", "esu_cu", "ru_only", "random", "train_only", "layers")


def _layer_masks(cfg, model: nn.Module, tokenizer, names: dict | None, description: dict) -> tuple[dict, set[str]]:
    f = cfg.freeze
    groups = resolve_units(model, names)
    prefix = groups[0].out_name.rsplit(".", 3)[0] if groups else "model.layers"
    n_layers = max(g.layer for g in groups) + 1
    if f.get("layers_like"):
        layer_ids = _middle_layers_like(cfg, model, tokenizer, names, prefix, n_layers, description)
    else:
        layer_ids = list(f.get("layers") or [])
    if not layer_ids:
        raise ConfigError("freeze=layers needs freeze.layers=[i, j, ...] (layer indices to freeze) or "
                          "freeze.layers_like=esu_cu (contiguous middle layers with as many frozen entries).")
    bad = [i for i in layer_ids if not -n_layers <= i < n_layers]
    if bad:
        raise ConfigError(f"freeze.layers: {bad} out of range for a model with {n_layers} layers.")
    wanted = {f"{prefix}.{i % n_layers}." for i in layer_ids}
    description["layers"] = sorted(i % n_layers for i in layer_ids)
    partial: dict[str, PartialMask] = {}
    return partial, {n for n, _ in model.named_parameters() if any(n.startswith(w) for w in wanted)}


def _middle_layers_like(cfg, model: nn.Module, tokenizer, names, prefix: str, n_layers: int,
                        description: dict) -> list[int]:
    """The contiguous block of middle decoder layers whose parameter entries come closest to the entries that
    freeze=<layers_like> freezes (SPPFT-style safety-layer freezing at the same budget)."""
    from omegaconf import OmegaConf

    like = cfg.freeze.layers_like
    if like not in ("esu", "esu_cu"):
        raise ConfigError(f"freeze.layers_like must be esu or esu_cu (a frozen unit set), got {like!r}.")
    like_cfg = OmegaConf.merge(cfg, {"freeze": {"strategy": like}})
    selection, _, _ = unit_selection(like_cfg, model, tokenizer, names, {})
    target = count_entries(model, *masks_from_selection(model, selection, "freeze", names))["frozen"]
    per_layer = [sum(p.numel() for n, p in model.named_parameters() if n.startswith(f"{prefix}.{i}."))
                 for i in range(n_layers)]

    def middle(size: int) -> range:
        return range((n_layers - size) // 2, (n_layers - size) // 2 + size)

    size = min(range(1, n_layers + 1), key=lambda n: abs(sum(per_layer[i] for i in middle(n)) - target))
    description.update(layers_like=like, like_entries=target)
    return list(middle(size))


def _load_map(cfg, model: nn.Module, tokenizer, names: dict | None) -> tuple[UnitMap, str]:
    f = cfg.freeze
    path = f.get("unit_map")
    if not path:
        if not f.get("auto_attribute", False):
            raise ConfigError(
                f"freeze={f.strategy} needs a unit map: run `python attribute.py model=...` and pass "
                f"freeze.unit_map=<run dir>/unit_map.safetensors (or set freeze.auto_attribute=true).")
        from safety_units.attribution import cached_attribution

        path = str(cached_attribution(cfg, model, tokenizer))
    return UnitMap.load(path, model=model, strict=f.get("strict_fingerprint", True), names=names), str(path)


def _train_only_classes(f) -> list[str]:
    classes = f.get("classes") or []
    classes = [classes] if isinstance(classes, str) else list(classes)
    bad = [c for c in classes if str(c).lower() not in CLASS_CODES]
    if bad:
        raise ConfigError(f"freeze.classes: unknown unit class(es) {bad}; use any of {sorted(CLASS_CODES)}.")
    if bool(classes) == (f.get("random_share") is not None):
        raise ConfigError("freeze=train_only needs exactly one of freeze.classes=[esu, ...] (units of a unit map) "
                          "and freeze.random_share=0.02 (a seeded random set, freeze.seed; no map needed).")
    return [str(c).lower() for c in classes]


def unit_selection(cfg, model: nn.Module, tokenizer, names: dict | None,
                   description: dict) -> tuple[Selection, str, str | None]:
    """(selection, mask mode, unit map path or None) of a unit strategy; fills `description`."""
    f = cfg.freeze
    strategy = f.strategy
    seed = int(f.get("seed", 0))
    if strategy == "train_only":
        classes = _train_only_classes(f)
        if not classes:  # a planted set: no map involved
            sizes = {g.key: g.n for g in resolve_units(model, names)}
            counts = share_counts(sizes, f.random_share, "freeze.random_share")
            description.update(random_share=float(f.random_share), seed=seed)
            return random_units(sizes, counts, seed), "train_only", None
        um, path = _load_map(cfg, model, tokenizer, names)
        description["classes"] = classes
        return um.select(classes), "train_only", path
    um, path = _load_map(cfg, model, tokenizer, names)
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
        selection = um.random_like(selection, seed=seed, match=f.get("match", "kind"))
        description["like"] = base
    return selection, "train_only" if base == "ru_only" else "freeze", path


def build_masker(cfg, model: nn.Module, tokenizer=None):
    """The Masker for cfg.freeze (None for `none`), and the path of the unit map it used."""
    f = cfg.freeze
    strategy = f.get("strategy", "none")
    if strategy not in STRATEGIES:
        raise ConfigError(f"freeze.strategy must be one of {STRATEGIES}, got {strategy!r}.")
    if strategy == "none":
        return None, None
    names = unit_names(cfg)
    description: dict = {"strategy": strategy}
    unit_map_path = selection = None
    mode = "freeze"
    if strategy == "layers":
        partial, frozen_full = _layer_masks(cfg, model, tokenizer, names, description)
    else:
        selection, mode, unit_map_path = unit_selection(cfg, model, tokenizer, names, description)
        partial, frozen_full = masks_from_selection(model, selection, mode, names)
        description["units_" + ("trainable" if mode == "train_only" else "frozen")] = selection_size(selection)
        if unit_map_path:
            description["unit_map"] = unit_map_path
    description["entries"] = count_entries(model, partial, frozen_full)
    masker = Masker(model, partial, frozen_full, mechanism=f.get("mechanism", "auto"), description=description,
                    check_every_n_steps=int(f.get("check_every_n_steps", 0) or 0), selection=selection, mode=mode)
    e = description["entries"]
    log.info("freeze=%s: %s frozen / %s trainable parameter entries (%.2f%% / %.2f%%); units: %s", strategy,
             f"{e['frozen']:,}", f"{e['trainable']:,}", 100 * e["frozen_share"], 100 * e["trainable_share"],
             description.get("units_frozen") or description.get("units_trainable") or description.get("layers"))
    return masker, unit_map_path
