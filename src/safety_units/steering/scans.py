"""`steer=scans`: SCANS (Cao et al., AAAI 2025; zouyingcao/SCANS: SCANS_llama.py, utils/llama_wrapper.py,
utils/modeling_utils.py), a Steerer (safety_units.steering.steerer):
1. refusal steering vectors: per block l, the mean output of block l at the last prompt token over harmful anchor
   prompts minus that over harmless ones, scaled to unit length (`get_safety_vectors`);
2. the steered (safety-critical) blocks: anchored by projecting each vector onto the vocabulary (final norm, LM
   head) and ranking the refusal tokens (`steer.refusal_tokens`): the contiguous window whose projections rank them
   highest, before the last blocks (anchor_window; the code fixes blocks 10-19 of Llama-2-7B's 32);
3. sigma(q): the hidden-state transition of a query, h_l[end of prompt] - h_l[a compliance token appended ("Sure")],
   compared by cosine, averaged over blocks, to the mean transition of the harmful anchors
   (`predict_safety`, `get_unsafe_reference_transition_vector`): harmful when the cosine >= threshold;
4. steering: block outputs at the prompt's last token and every later (generated) token get -alpha * v_l for a query
   judged harmless and +alpha * v_l (times `harmful_sign`) for one judged harmful (`BlockOutputWrapper`,
   `add_vector_after_position`).

The fit (vectors, anchored blocks, anchor transitions) is cached per model fingerprint and anchor data under
`<cache_dir>/steering/`; alpha, harmful_sign, layers and sigma are applied when the hooks are installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safety_units.data.chat import prompt_text
from safety_units.models.forward import head_logits
from safety_units.steering.steerer import AnchoredSteerer, SteeringHooks
from safety_units.steering.prompt_states import block_states, chat_ids, difference_of_means, token_ids
from safety_units.units.layouts import decoder_layers, names_for, submodule
from safety_units.utils.errors import ConfigError
from safety_units.utils.ranks import RankedLogger

log = RankedLogger(__name__)


# --------------------------------------------------------------------------- prompts and block states
def generation_header(tokenizer) -> list[int]:
    """The token ids the chat template adds to open the assistant turn (SCANS's instruction end, `[/INST]`)."""
    msgs = [{"role": "user", "content": "Hello"}]
    with_header = tokenizer(prompt_text(tokenizer, msgs), add_special_tokens=False)["input_ids"]
    without = tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False),
                        add_special_tokens=False)["input_ids"]
    n = 0
    while n < min(len(with_header), len(without)) and with_header[n] == without[n]:
        n += 1
    return with_header[n:]


# --------------------------------------------------------------------------- fitting
def blocks_runner(model) -> torch.nn.Module:
    """The module whose forward runs the decoder blocks (the parent of `units.names.layers`), called once per pass
    with the input_ids: decoder(model) for most, but OPTForCausalLM calls its model.decoder directly."""
    path = names_for(model)["layers"]
    return submodule(model, path.rsplit(".", 1)[0]) if "." in path else model


FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm")  # Llama, GPT-2 / Falcon, NeoX / OPT, Phi


def final_norm(model) -> torch.nn.Module | None:
    """The norm between the last block and the LM head (a sibling of the block list), None when there is none."""
    runner = blocks_runner(model)
    return next((getattr(runner, n) for n in FINAL_NORMS if isinstance(getattr(runner, n, None), torch.nn.Module)),
                None)


def vocabulary_scores(model, vectors: torch.Tensor, refusal: list[int]) -> torch.Tensor:
    """Per block: the mean percentile rank (1 = top) of the refusal tokens when the unit vector is projected onto
    the vocabulary through the final norm and the LM head (the logit lens)."""
    norm = final_norm(model)
    with torch.no_grad():
        dev = next(model.parameters()).device
        v = vectors.to(dev, next(model.parameters()).dtype)
        logits = head_logits(model, norm(v) if norm is not None else v)  # [layers, vocab]
        ranks = logits.argsort(dim=1, descending=True).argsort(dim=1)[:, refusal].float()
    return (1 - ranks / logits.shape[1]).mean(dim=1).cpu()


def anchor_window(scores: torch.Tensor, num_layers: int | None, max_layer_share: float) -> list[int]:
    """The contiguous window of blocks whose vocabulary projections rank the refusal tokens highest on average,
    among the blocks before max_layer_share of the depth (the last blocks decode the output format: they rank every
    token cleanly and steering them degrades the text, as the paper finds); num_layers: a third of the blocks by
    default (the code steers 10 of Llama-2-7B's 32)."""
    n = len(scores)
    k = int(num_layers or max(1, round(n / 3)))
    limit = max(k, min(n, round(max_layer_share * n)))
    start = max(range(limit - k + 1), key=lambda i: (float(scores[i:i + k].mean()), -i))
    return list(range(start, start + k))


def transitions(model, tokenizer, prompts: list[str], cfg, compliance: list[int]) -> torch.Tensor:
    """SCANS's hidden-state transition per prompt and block: h[end of prompt] - h[compliance token]:
    [num_layers, prompts, hidden]."""
    rows = [r + compliance for r in chat_ids(tokenizer, prompts, int(cfg.anchor.get("max_length", 256)))]
    st = block_states(model, rows, (-1 - len(compliance), -1), tokenizer.pad_token_id,
                      int(cfg.anchor.get("batch_size", 16)))
    return st[:, :, 0] - st[:, :, 1]


def transition_cosines(trans: torch.Tensor, reference: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """sigma(q)'s score per prompt: the cosine to the reference transition, averaged over `layers`."""
    cos = F.cosine_similarity(trans[layers], reference[layers][:, None, :], dim=-1).nan_to_num(0.0)
    return cos.mean(dim=0)


def best_threshold(harmful: torch.Tensor, harmless: torch.Tensor) -> tuple[float, float]:
    """The cosine threshold with the best balanced accuracy on the anchors (midpoints between sorted scores)."""
    values = torch.cat([harmful, harmless]).sort().values
    cands = torch.cat([values[:1] - 1e-6, (values[1:] + values[:-1]) / 2, values[-1:] + 1e-6])
    best = (-1.0, 0.0)
    for t in cands.tolist():
        acc = 0.5 * (float((harmful >= t).float().mean()) + float((harmless < t).float().mean()))
        if acc > best[0] + 1e-12:
            best = (acc, t)
    return best[1], best[0]


def fit_scans(model, tokenizer, cfg, prompts: dict[str, list[str]]) -> dict:
    vectors = difference_of_means(model, tokenizer, prompts, cfg)
    norms = vectors.norm(dim=1)
    unit = vectors / norms.clamp_min(1e-12)[:, None]
    refusal = token_ids(tokenizer, list(cfg.refusal_tokens))
    scores = vocabulary_scores(model, unit, refusal)
    anchored = anchor_window(scores, cfg.anchor.get("num_layers"), float(cfg.anchor.get("max_layer_share", 0.75)))
    compliance = tokenizer(str(cfg.sigma.compliance), add_special_tokens=False)["input_ids"]
    trans = {k_: transitions(model, tokenizer, p, cfg, compliance) for k_, p in prompts.items()}
    reference = trans["harmful"].mean(dim=1)
    return {"method": "scans", "vectors": unit, "norms": norms, "vocab_scores": scores, "anchored": anchored,
            "reference": reference, "compliance": compliance, "anchor_transitions": trans,
            "refusal_token_ids": refusal}


def sigma_setup(art: dict, cfg) -> dict:
    """sigma(q)'s blocks and threshold for these settings (cheap: from the cached anchor transitions)."""
    layers = list(cfg.layers) if cfg.get("layers") else art["anchored"]
    n = len(art["vectors"])
    bad = [i for i in layers if not 0 <= int(i) < n]
    if bad:
        raise ConfigError(f"steer.layers: blocks {bad} do not exist (the model has {n}: 0..{n - 1}).")
    sig_layers = list(cfg.sigma.layers) if cfg.sigma.get("layers") else list(range(min(layers), n))
    cos = {k: transition_cosines(t, art["reference"], sig_layers) for k, t in art["anchor_transitions"].items()}
    threshold, acc = best_threshold(cos["harmful"], cos["harmless"])
    if cfg.sigma.get("threshold") is not None:
        threshold = float(cfg.sigma.threshold)
        acc = 0.5 * (float((cos["harmful"] >= threshold).float().mean())
                     + float((cos["harmless"] < threshold).float().mean()))
    return {"layers": [int(i) for i in layers], "sigma_layers": sig_layers, "threshold": threshold,
            "anchor_balanced_accuracy": acc}


def sigma_scores(model, tokenizer, art: dict, setup: dict, prompts: list[str], cfg) -> torch.Tensor:
    """sigma(q)'s cosine for raw prompts (harmful when >= setup['threshold'])."""
    return transition_cosines(transitions(model, tokenizer, prompts, cfg, art["compliance"]), art["reference"],
                              setup["sigma_layers"])


# --------------------------------------------------------------------------- the hooks
class ScansHooks(SteeringHooks):
    """Installs SCANS on a model: a pre-hook on the decoder classifies each new sequence (sigma(q)) and marks the
    positions from the end of its prompt on; forward hooks add the signed, scaled vectors to the steered blocks."""

    def __init__(self, model, tokenizer, art: dict, setup: dict, alpha: float, harmful_sign: float):
        self.model, self.art, self.setup = model, art, setup
        self.alpha, self.harmful_sign = float(alpha), float(harmful_sign)
        self.header = generation_header(tokenizer)
        self.pad = tokenizer.pad_token_id
        self.busy = False
        self.coef = self.positions = None
        self.decisions: list[bool] = []  # sigma(q) per classified sequence: True = judged harmful

    def prompt_ends(self, ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
        """Per row: the index of the last token of the last assistant header (-1 when none: steer every token)."""
        ends, h = [], self.header
        for row, m in zip(ids.tolist(), mask.tolist()):
            end = -1
            for i in range(len(row) - len(h), -1, -1):
                if h and m[i] and row[i:i + len(h)] == h:
                    end = i + len(h) - 1
                    break
            ends.append(end)
        return ends

    def classify(self, ids: torch.Tensor, mask: torch.Tensor, ends: list[int]) -> torch.Tensor:
        rows = []
        for row, m, end in zip(ids.tolist(), mask.tolist(), ends):
            kept = [t for t, k in zip(row[:end + 1] if end >= 0 else row, m) if k]
            rows.append(kept + self.art["compliance"])
        self.busy = True
        try:
            st = block_states(self.model, rows, (-1 - len(self.art["compliance"]), -1), self.pad, len(rows))
        finally:
            self.busy = False
        cos = transition_cosines(st[:, :, 0] - st[:, :, 1], self.art["reference"], self.setup["sigma_layers"])
        return cos >= self.setup["threshold"]

    def pre_hook(self, module, args, kwargs):
        if self.busy:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ConfigError("steer=scans needs input_ids (it classifies the prompt); inputs_embeds are not supported.")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        if past > 0 and self.coef is not None and len(self.coef) == len(ids):  # a decoding step: all after the prompt
            self.positions = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
            return
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None or mask.dim() != 2 else mask[:, -ids.shape[1]:]
        ends = self.prompt_ends(ids, mask)
        harmful = self.classify(ids, mask, ends)
        self.decisions += harmful.tolist()
        self.coef = torch.where(harmful, self.alpha * self.harmful_sign, -self.alpha).to(ids.device)
        cols = torch.arange(ids.shape[1], device=ids.device)
        self.positions = cols[None, :] >= torch.tensor(ends, device=ids.device).clamp_min(0)[:, None]

    def block_hook(self, layer: int):
        v = self.art["vectors"][layer]

        def hook(module, args, output):
            if self.busy or self.positions is None:
                return None
            h = output[0] if isinstance(output, tuple) else output
            add = (self.coef[:, None, None] * self.positions[..., None]) * v.to(h.device)
            h = h + add.to(h.dtype)
            return (h, *output[1:]) if isinstance(output, tuple) else h
        return hook

    def hooks(self) -> list:
        layers = decoder_layers(self.model)
        handles = [blocks_runner(self.model).register_forward_pre_hook(self.pre_hook, with_kwargs=True)]
        handles += [layers[i].register_forward_hook(self.block_hook(i)) for i in self.setup["layers"]]
        return handles

    def summary(self) -> dict:
        n = len(self.decisions)
        return {"method": "scans", "alpha": self.alpha, "harmful_sign": self.harmful_sign, **self.setup,
                "vocab_scores": [round(float(s), 4) for s in self.art["vocab_scores"]],
                "sequences_classified": n, "judged_harmful": sum(self.decisions)}


class ScansSteerer(AnchoredSteerer):
    """steer=scans (conf/steer/scans.yaml): the fit is cached; alpha, harmful_sign, layers and sigma only set up
    the hooks."""

    method = "scans"
    install_settings = ("alpha", "harmful_sign", "layers", "sigma")

    def __init__(self, anchor: dict, refusal_tokens: list[str], sigma: dict, alpha: float, harmful_sign: float = 1,
                 layers: list[int] | None = None, cache_dir: str | None = None, method: str | None = None):
        super().__init__(method, anchor=anchor, refusal_tokens=refusal_tokens, cache_dir=cache_dir, alpha=alpha,
                         harmful_sign=harmful_sign, layers=layers, sigma=sigma)

    def fit_artifacts(self, model, tokenizer, prompts: dict[str, list[str]]) -> dict:
        return fit_scans(model, tokenizer, self.cfg, prompts)

    def setup(self, art: dict) -> dict:
        """The steered blocks, sigma(q)'s blocks and threshold for these settings (sigma_setup)."""
        return sigma_setup(art, self.cfg)

    def steered_layers(self, model, tokenizer) -> list[int]:
        """The blocks SCANS steers on this model (fitted once, cached)."""
        return self.setup(self.artifacts(model, tokenizer))["layers"]

    def hooks_for(self, model, tokenizer, art: dict) -> ScansHooks:
        cfg = self.cfg
        installer = ScansHooks(model, tokenizer, art, self.setup(art), cfg.alpha, cfg.get("harmful_sign", 1))
        log.info("steer=scans: alpha %s on blocks %s; sigma(q) on blocks %s..%s, threshold %.4f (anchor balanced "
                 "accuracy %.3f)", cfg.alpha, installer.setup["layers"], installer.setup["sigma_layers"][0],
                 installer.setup["sigma_layers"][-1], installer.setup["threshold"],
                 installer.setup["anchor_balanced_accuracy"])
        return installer
