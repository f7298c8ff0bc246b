"""The model's block outputs at chosen prompt positions, and the prompts they are read on: shared by steering
(safety_units.steering.scans, safety_units.steering.refusal_ablation) and the synthetic testbed's analyses."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from safety_units.data.chat import prompt_text
from safety_units.utils.errors import ConfigError
from safety_units.models.forward import decoder, eval_mode, head_logits
from safety_units.data.sources import Source
from safety_units.units.layouts import decoder_layers


def anchor_prompts(source_cfg, nsamples: int, seed: int, name: str) -> list[str]:
    """The raw prompts of one anchor set (the first `nsamples` in the source's seeded order)."""
    src = Source.from_config(OmegaConf.to_container(source_cfg, resolve=True) if OmegaConf.is_config(source_cfg)
                             else source_cfg, name)
    src.limit = None
    return [ex.prompt for ex in src.load(seed, require_response=False)[:nsamples]]


def chat_ids(tokenizer, prompts: list[str], max_length: int = 512) -> list[list[int]]:
    """Templated prompts (ending with the assistant header) as token ids; a long prompt loses its start."""
    return [tokenizer(prompt_text(tokenizer, [{"role": "user", "content": p}]), add_special_tokens=False)
            ["input_ids"][-max_length:] for p in prompts]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


@torch.no_grad()
def block_states(model, rows: list[list[int]], offsets: tuple[int, ...], pad_id: int, batch_size: int = 16,
                 final: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block outputs at positions `offsets` counted from each row's end (-1: its last token):
    [num_layers, rows, len(offsets), hidden] float32; with `final`, also the LM-head logits at the last token."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    states, logits, current = [], [], {}

    def grab(i):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            current[i] = h[:, list(offsets)].float().cpu()
        return hook

    handles = [layer.register_forward_hook(grab(i)) for i, layer in enumerate(layers)]
    try:
        with eval_mode(model):
            for b in range(0, len(rows), batch_size):
                ids, mask = left_pad(rows[b:b + batch_size], pad_id)
                out = decoder(model)(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                states.append(torch.stack([current[i] for i in range(len(layers))]))
                if final:
                    logits.append(head_logits(model, out.last_hidden_state[:, -1]).cpu())
    finally:
        for h in handles:
            h.remove()
    st = torch.cat(states, dim=1)
    return (st, torch.cat(logits)) if final else st


def token_ids(tokenizer, words: list[str]) -> list[int]:
    """The first token of each word (as it starts a response or follows a space), deduplicated."""
    ids = []
    for w in words:
        toks = tokenizer(w, add_special_tokens=False)["input_ids"]
        if not toks:
            raise ConfigError(f"steer.refusal_tokens: {w!r} tokenizes to nothing.")
        if toks[0] not in ids:
            ids.append(toks[0])
    return ids


def difference_of_means(model, tokenizer, prompts: dict[str, list[str]], cfg) -> torch.Tensor:
    """[num_layers, hidden]: mean block output at the last prompt token, harmful minus harmless."""
    bs, ml, pad = int(cfg.anchor.get("batch_size", 16)), int(cfg.anchor.get("max_length", 256)), tokenizer.pad_token_id
    mean = {k: block_states(model, chat_ids(tokenizer, p, ml), (-1,), pad, bs)[:, :, 0].double().mean(1)
            for k, p in prompts.items()}
    return (mean["harmful"] - mean["harmless"]).float()
