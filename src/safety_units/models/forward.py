"""Forward helpers every layer above uses: eval mode, temporary hooks, the decoder without its LM head, hidden
states, response-token NLL in chunks (checkpointed where it trains)."""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def eval_mode(model):
    """model.eval() for the block (no dropout), then the mode it had -- also when the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def forward_hooks(hooks: dict):
    """{module: hook}: each registered as a forward hook for the block, all removed also when the block raises."""
    handles = []
    try:
        for m, fn in hooks.items():
            handles.append(m.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def frozen_weights(model):
    """No parameter requires grad inside (gradients flow to activations or gates only); flags restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def decoder(model):
    """The transformer without its LM head: attribution needs unit activations, not 49k-way logits."""
    prefix = getattr(model, "base_model_prefix", "")
    return getattr(model, prefix, model) if prefix else model


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states [batch, seq, hidden] without the LM head."""
    return decoder(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def head_logits(model, h: torch.Tensor) -> torch.Tensor:
    """LM-head logits (float32) for selected hidden states, with the model's final soft-capping if it has one."""
    logits = model.get_output_embeddings()(h).float()
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def response_token_nll(model, batch: dict, chunk: int = 64, checkpointed: bool = False,
                       positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL of every response token (labels != -100) and the number of them per row.

    Logits are computed only at response positions and in chunks, so the [batch, seq, vocab] tensor never exists;
    `checkpointed` recomputes each chunk in backward instead of keeping its logits (SNIP). `positions` ([batch, seq]
    bool, as `token_mask`) restricts the loss to the response tokens predicted at those positions."""
    hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"])
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    if positions is not None:
        keep = keep & positions[:, :-1]
    h, y = hidden[:, :-1][keep], labels[keep]

    def nll(h_part, y_part):
        return torch.nn.functional.cross_entropy(head_logits(model, h_part), y_part, reduction="none")

    parts = [checkpoint(nll, h[i:i + chunk], y[i:i + chunk], use_reentrant=False) if checkpointed
             else nll(h[i:i + chunk], y[i:i + chunk]) for i in range(0, y.numel(), chunk)]
    return (torch.cat(parts) if parts else h.new_zeros(0)), keep.sum(dim=1)
