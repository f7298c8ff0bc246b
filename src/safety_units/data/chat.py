"""The chat template and label masking: render a conversation, locate its response tokens, encode and pad.

Shared by training (safety_units.data.datamodule), generation, attribution's calibration batches and evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from safety_units.utils.errors import DataError

IGNORE_INDEX = -100

def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def prompt_text(tokenizer, messages: list[dict]) -> str:
    """The text a model sees before it answers: the conversation up to the last assistant turn."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return render(tokenizer, messages, add_generation_prompt=True)


def chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """Split the templated conversation into (text, is_loss) pieces; assistant turns carry the loss."""
    full = render(tokenizer, messages, add_generation_prompt=False)
    pieces, pos = [], 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:k], add_generation_prompt=True)
        after = render(tokenizer, messages[: k + 1], add_generation_prompt=False)
        if not (after.startswith(before) and full.startswith(after) and len(before) >= pos):
            raise DataError(
                "the chat template does not render conversations prefix-stably, so the response tokens cannot be "
                "located; set model.chat_template to a template whose prompt is a prefix of prompt + response."
            )
        pieces.append((full[pos:len(before)], False))
        pieces.append((full[len(before):len(after)], True))
        pos = len(after)
    if pos < len(full):
        pieces.append((full[pos:], False))
    return [(t, loss) for t, loss in pieces if t]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated_prompt: bool = False
    truncated_response: bool = False


def encode_example(tokenizer, messages: list[dict], max_length: int, min_response_tokens: int = 16) -> Encoded:
    """Token ids and labels (-100 on everything that is not an assistant turn), truncated to max_length.

    Truncation never silently drops the response: the response tail is cut first; if the prompt alone leaves less
    than `min_response_tokens`, the prompt is cut from the left so that many response tokens survive.
    """
    ids, labels = [], []
    for text, is_loss in chat_segments(tokenizer, messages):
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(toks)
        labels.extend(toks if is_loss else [IGNORE_INDEX] * len(toks))
    if len(ids) <= max_length:
        return Encoded(ids, labels)
    first_loss = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))
    n_loss = sum(lab != IGNORE_INDEX for lab in labels)
    keep_loss = min(n_loss, min_response_tokens)
    truncated_prompt = False
    if first_loss > max_length - keep_loss:  # the prompt leaves too little room: cut it from the left
        cut = first_loss - (max_length - keep_loss)
        ids, labels = ids[cut:], labels[cut:]
        truncated_prompt = True
    return Encoded(ids[:max_length], labels[:max_length], truncated_prompt, True)


def collate(batch: list[Encoded], pad_id: int, pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """Right-pad a batch for training; padding has label -100 and attention 0."""
    n = max(len(b.input_ids) for b in batch)
    if pad_to_multiple_of > 1:
        n = int(math.ceil(n / pad_to_multiple_of) * pad_to_multiple_of)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b.input_ids)
        ids[i, :k] = torch.tensor(b.input_ids)
        labels[i, :k] = torch.tensor(b.labels)
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
