"""Batched greedy decoding: chat template, left padding, KV cache, progress bar, deterministic.

Prompts are sorted by length so that each batch carries little padding; results come back in input order.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from safety_units.data.chat import prompt_text
from safety_units.models.forward import eval_mode
from safety_units.utils.fingerprints import fingerprint_key, model_fingerprint
from safety_units.utils.ranks import RankedLogger
from safety_units.data.sources import Example

log = RankedLogger(__name__)


def _stop_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return sorted(i for i in ids if i is not None)


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 128, batch_size: int = 16,
             progress: bool = True, desc: str = "generate") -> list[str]:
    """Greedy completions of already-templated prompt texts, in input order."""
    from transformers import GenerationConfig

    if not prompts:
        return []
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    stops = _stop_ids(model, tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
    out: list[str | None] = [None] * len(prompts)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with eval_mode(model):
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):  # left padding: every prompt ends where generation starts
                ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[r, width - len(encoded[i]):] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            for r, i in enumerate(batch):
                out[i] = tokenizer.decode(gen[r, width:], skip_special_tokens=True).strip()
    return out  # type: ignore[return-value]


def generate_chat(model, tokenizer, messages_list: list[list[dict]], **kw) -> list[str]:
    return generate(model, tokenizer, [prompt_text(tokenizer, m) for m in messages_list], **kw)


# --------------------------------------------------------------------------- self-distillation
def self_distill_responses(model, tokenizer, examples: list[Example], cache_dir: str | None,
                           max_new_tokens: int = 256, batch_size: int = 16) -> list[Example]:
    """Give prompt-only examples the model's own greedy answers; cached by model fingerprint and data hash."""
    prompts = [prompt_text(tokenizer, ex.messages) for ex in examples]
    data_hash = hashlib.sha256("\x00".join(prompts).encode()).hexdigest()[:16]
    key = f"{fingerprint_key(model_fingerprint(model))}-{data_hash}-n{max_new_tokens}"
    path = Path(cache_dir or ".") / "self_distill" / f"{key}.jsonl"
    if path.is_file():
        responses = [json.loads(line)["response"] for line in path.read_text().splitlines()]
        log.info("self-distill: %d cached responses from %s", len(responses), path)
    else:
        log.info("self-distill: generating %d responses with %s (cached in %s)", len(prompts),
                 getattr(model.config, "_name_or_path", None) or type(model).__name__, path)
        responses = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             desc="self-distill")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in zip(prompts, responses)))
        os.replace(tmp, path)
    out, empty = [], 0
    for ex, resp in zip(examples, responses):
        if not resp.strip():
            empty += 1
            continue
        msgs = ex.messages[:-1] if ex.messages[-1]["role"] == "assistant" else ex.messages
        out.append(Example(msgs + [{"role": "assistant", "content": resp}], ex.source, ex.row, ex.raw_prompt))
    if empty:
        log.warning("self-distill: dropped %d prompts whose generated response was empty", empty)
    return out
