"""What the harm judges read: a backbone's hidden states over the response of a chat-formatted (prompt, response)
pair, pooled, at one or several layers (safety_units.evaluation.judges.harm).

The backbone reads the user prompt through the tokenizer's chat template, then the response tokens, exactly as a
generation continues its prompt. Pools over the RESPONSE tokens only (the prompt is context, not averaged in, so a
harmful prompt alone does not make a harmless answer look harmful): `mean` (their average) and `last` (the last
response token's state: what the model has read by the end). An empty response pools the last prompt token.
One forward per batch computes every requested layer, and stops after the deepest one.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from safety_units.data.chat import prompt_text
from safety_units.utils.errors import ConfigError

POOLS = ("mean", "last")


def layer_indices(layers, n_layers: int, key: str = "harm_judge.layers") -> list[int]:
    """Hidden-state indices 0..n_layers (0: the embeddings) from floats (a fraction of the depth) or ints."""
    items = list(layers) if hasattr(layers, "__iter__") else [layers]
    if not items:
        raise ConfigError(f"{key} is empty: give hidden-state indices (ints) or depth fractions (floats).")
    out = [int(round(x * n_layers)) if isinstance(x, float) else int(x) for x in items]
    bad = [x for x, i in zip(items, out) if not 0 <= i <= n_layers]
    if bad:
        raise ConfigError(f"{key}: {bad} outside the backbone's hidden states 0..{n_layers}.")
    return sorted(set(out))


class _Stop(Exception):
    """Raised once the deepest wanted layer has run: the layers above it (and the LM head) are not needed."""


def _states(model, ids: torch.Tensor, mask: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """hidden_states[l] for each wanted l, running the decoder only as deep as the deepest one where it can."""
    decoder = getattr(model, "base_model", model)  # without the LM head
    blocks = getattr(decoder, "layers", None)
    if blocks is None or max(layers) >= len(blocks) or 0 in layers:  # embeddings or the normed last state
        hs = decoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
        return {i: hs[i] for i in layers}
    got: dict[int, torch.Tensor] = {}

    def grab(i):
        def hook(_module, _args, output):
            got[i] = output[0] if isinstance(output, tuple) else output
            if i == max(layers):
                raise _Stop
        return hook

    handles = [blocks[i - 1].register_forward_hook(grab(i)) for i in layers]
    try:
        decoder(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return got


def pair_sequences(tokenizer, prompts: list[str], responses: list[str], max_tokens: int,
                   max_prompt_tokens: int) -> tuple[list[list[int]], list[int]]:
    """Token ids of each chat-formatted pair (prompt cut to max_prompt_tokens, response to max_tokens) and where
    its response starts (an empty response: its last prompt token)."""
    seqs, starts = [], []
    for p, r in zip(prompts, responses):
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        user = tokenizer.decode(p_ids[:max_prompt_tokens]) if len(p_ids) > max_prompt_tokens else p
        prefix = tokenizer(prompt_text(tokenizer, [{"role": "user", "content": user}]),
                           add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(r, add_special_tokens=False)["input_ids"][:max_tokens]
        seqs.append(prefix + r_ids)
        starts.append(len(prefix) if r_ids else len(prefix) - 1)
    return seqs, starts


@torch.no_grad()
def pair_states(model, tokenizer, prompts: list[str], responses: list[str], layers: list[int], max_tokens: int,
                max_prompt_tokens: int = 64, batch_size: int = 32, desc: str = "harm features") -> torch.Tensor:
    """[n, len(layers), len(POOLS), hidden] float32: each pair's response states, pooled, at each layer."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seqs, starts = pair_sequences(tokenizer, prompts, responses, max_tokens, max_prompt_tokens)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # similar lengths together: little padding
    out = torch.zeros(len(seqs), len(layers), len(POOLS), model.config.hidden_size)
    was_training = model.training
    model.eval()
    try:
        for b in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=len(order) <= batch_size):
            idx = order[b:b + batch_size]
            x = torch.full((len(idx), len(seqs[idx[0]])), pad, dtype=torch.long)
            attn = torch.zeros_like(x)
            resp = torch.zeros_like(x, dtype=torch.float)
            last = torch.tensor([len(seqs[i]) - 1 for i in idx])
            for r, i in enumerate(idx):  # right padding: positions of real tokens start at 0
                x[r, :len(seqs[i])] = torch.tensor(seqs[i])
                attn[r, :len(seqs[i])] = 1
                resp[r, starts[i]:len(seqs[i])] = 1.0
            states = _states(model, x.to(device), attn.to(device), layers)
            m = resp.to(device).unsqueeze(-1)
            for j, layer in enumerate(layers):
                hs = states[layer].float()
                out[idx, j, 0] = ((hs * m).sum(1) / m.sum(1)).cpu()
                out[idx, j, 1] = hs[torch.arange(len(idx), device=hs.device), last.to(hs.device)].cpu()
    finally:
        model.train(was_training)
    return out


def select(states: torch.Tensor, pools: list[str]) -> torch.Tensor:
    """pair_states' output as one feature vector per pair: the given pools of every layer, concatenated."""
    bad = sorted(set(pools) - set(POOLS))
    if bad or not pools:
        raise ConfigError(f"harm_judge.pools must be a non-empty list of {POOLS}, got {list(pools)}.")
    idx = [POOLS.index(p) for p in pools]
    return states[:, :, idx].reshape(states.shape[0], -1)
