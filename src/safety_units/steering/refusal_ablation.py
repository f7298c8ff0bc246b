"""`steer=refusal_ablation`: Arditi et al. (2024, "Refusal in language models is mediated by a single direction";
andyrdt/refusal_direction, pipeline/submodules/select_direction.py) -- directional ablation of the refusal direction.

Candidates: the difference-of-means direction r_l at the last prompt token of every block l < max_layer_share * L
(the paper's filter: later blocks write the output format, not the decision). For each candidate, with r_l ablated
(x <- x - (x . r) r for every write to the residual stream: embeddings, attention and MLP outputs, at every
position), measured on the anchors:
  * the refusal score of the harmful anchors: mean log-odds of the refusal tokens at the first response position,
    log p(refusal) - log(1 - p(refusal));
  * the KL divergence of the harmless anchors' first-response-token distribution from the unablated model's.
The chosen direction has the lowest refusal score among those with KL < kl_max (the paper's 0.1); if none passes,
the lowest KL is taken, with a warning.
The fit is cached (safety_units.steering.steerer.AnchoredSteerer).
"""

from __future__ import annotations

import torch

from safety_units.models.forward import decoder, forward_hooks
from safety_units.steering.steerer import AnchoredSteerer, SteeringHooks
from safety_units.steering.prompt_states import block_states, chat_ids, difference_of_means, token_ids
from safety_units.units.layouts import decoder_layers, mlp_writer, names_for, submodule
from safety_units.utils.errors import ConfigError
from safety_units.utils.ranks import RankedLogger

log = RankedLogger(__name__)


# Sandwich-norm blocks (Gemma-2/3, OLMo-2) rescale each sublayer's output per channel before adding it: there the
# norms are what writes to the residual stream (Llama's and NeoX's post_attention_layernorm is the MLP's pre-norm:
# a block is sandwich-normed only when it has both)
POST_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")


def residual_writers(model) -> list[torch.nn.Module]:
    """The modules whose outputs are added to the residual stream: the token embeddings, learned position
    embeddings (GPT-2's wpe, OPT's embed_positions), and per block the attention and MLP output projections
    (`units.names`) or, in a sandwich-norm block, the norms after them."""
    names = names_for(model, None)
    layers = decoder_layers(model, names)
    inside = {id(m) for m in layers.modules()}
    out = [model.get_input_embeddings()]
    out += [m for m in decoder(model).modules()
            if isinstance(m, torch.nn.Embedding) and m is not out[0] and id(m) not in inside]
    for layer in layers:
        if all(hasattr(layer, n) for n in POST_NORMS):
            out += [getattr(layer, n) for n in POST_NORMS]
        else:
            out += [submodule(layer, names["attn"]["out"]), mlp_writer(layer, names)]
    return out


def ablation_hook(direction: torch.Tensor):
    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output  # gpt-oss' MoE block also returns router scores
        r = direction.to(h.device, h.dtype)
        h = h - (h @ r)[..., None] * r
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
    return hook


def refusal_log_odds(logits: torch.Tensor, refusal: list[int]) -> torch.Tensor:
    p = logits.float().softmax(-1)[:, refusal].sum(-1).clamp(1e-12, 1 - 1e-12)
    return p.log() - (1 - p).log()


def fit_refusal_ablation(model, tokenizer, cfg, prompts: dict[str, list[str]]) -> dict:
    vectors = difference_of_means(model, tokenizer, prompts, cfg)
    unit = vectors / vectors.norm(dim=1).clamp_min(1e-12)[:, None]
    refusal = token_ids(tokenizer, list(cfg.refusal_tokens))
    n = len(unit)
    bs, ml, pad = int(cfg.anchor.get("batch_size", 16)), int(cfg.anchor.get("max_length", 256)), tokenizer.pad_token_id
    rows = {k: chat_ids(tokenizer, p, ml) for k, p in prompts.items()}

    def last_logits(k):
        return block_states(model, rows[k], (-1,), pad, bs, final=True)[1]

    base_harmful, base_harmless = last_logits("harmful"), last_logits("harmless")
    writers = residual_writers(model)
    if cfg.get("layer") is not None:
        if not 0 <= int(cfg.layer) < n:
            raise ConfigError(f"steer.layer={cfg.layer}: the model has blocks 0..{n - 1}.")
        candidates = [int(cfg.layer)]
    else:
        candidates = list(range(max(1, int(float(cfg.get("max_layer_share", 0.8)) * n))))
    scores = {}
    base_lp = base_harmless.float().log_softmax(-1)
    for layer in candidates:
        with forward_hooks({w: ablation_hook(unit[layer]) for w in writers}):
            harmful, harmless = last_logits("harmful"), last_logits("harmless")
        kl = (base_lp.exp() * (base_lp - harmless.float().log_softmax(-1))).sum(-1).mean()
        scores[layer] = {"refusal_score": float(refusal_log_odds(harmful, refusal).mean()), "kl": float(kl)}
    kl_max = float(cfg.get("kl_max", 0.1))
    passing = [la for la in candidates if scores[la]["kl"] < kl_max]
    if passing:
        layer = min(passing, key=lambda la: scores[la]["refusal_score"])
    else:
        layer = min(candidates, key=lambda la: scores[la]["kl"])
        log.warning("steer=refusal_ablation: no candidate direction keeps the harmless KL below %s; taking block "
                    "%d (lowest KL %.3f)", kl_max, layer, scores[layer]["kl"])
    return {"method": "refusal_ablation", "direction": unit[layer], "layer": layer, "candidates": scores,
            "kl_max": kl_max, "kl_passed": bool(passing),
            "baseline_refusal_score": float(refusal_log_odds(base_harmful, refusal).mean()),
            "refusal_token_ids": refusal}


class AblationHooks(SteeringHooks):
    def __init__(self, model, art: dict):
        self.model, self.art = model, art

    def hooks(self) -> list:
        hook = ablation_hook(self.art["direction"])
        return [w.register_forward_hook(hook) for w in residual_writers(self.model)]

    def summary(self) -> dict:
        cand = self.art["candidates"][self.art["layer"]]
        return {"method": "refusal_ablation", "layer": self.art["layer"],
                "refusal_score": round(cand["refusal_score"], 4), "kl": round(cand["kl"], 4),
                "kl_max": self.art.get("kl_max"), "kl_passed": self.art.get("kl_passed"),  # None: cached before
                "baseline_refusal_score": round(self.art["baseline_refusal_score"], 4)}


class RefusalAblationSteerer(AnchoredSteerer):
    """steer=refusal_ablation (conf/steer/refusal_ablation.yaml): every setting changes the fit (all in its cache
    key)."""

    method = "refusal_ablation"

    def __init__(self, anchor: dict, refusal_tokens: list[str], layer: int | None = None,
                 max_layer_share: float = 0.8, kl_max: float = 0.1, cache_dir: str | None = None,
                 method: str | None = None):
        super().__init__(method, anchor=anchor, refusal_tokens=refusal_tokens, cache_dir=cache_dir, layer=layer,
                         max_layer_share=max_layer_share, kl_max=kl_max)

    def fit_artifacts(self, model, tokenizer, prompts: dict[str, list[str]]) -> dict:
        return fit_refusal_ablation(model, tokenizer, self.cfg, prompts)

    def hooks_for(self, model, tokenizer, art: dict) -> AblationHooks:
        log.info("steer=refusal_ablation: direction of block %d ablated from every residual write", art["layer"])
        return AblationHooks(model, art)
