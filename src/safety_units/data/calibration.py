"""Calibration batches: the templated, batched examples that scorers and the drift monitor run the model on."""

from __future__ import annotations

from safety_units.data.chat import IGNORE_INDEX, Encoded, collate, encode_example, prompt_text
from safety_units.utils.errors import ConfigError
from safety_units.data.generation import self_distill_responses
from safety_units.data.sources import Source


def _calibration_examples(source_cfg, nsamples: int, seed: int, name: str) -> tuple[Source, list]:
    src = Source.from_config(source_cfg, name)
    if src.limit is None:
        src.limit = nsamples
    return src, src.load(seed)[:nsamples]


def _batched(encoded: list[Encoded], batch_size: int, pad_id: int) -> list[dict]:
    encoded.sort(key=lambda e: len(e.input_ids))  # sorted by length: less padding
    return [collate(encoded[i:i + batch_size], pad_id) for i in range(0, len(encoded), batch_size)]


def calibration_batches(tokenizer, source_cfg, nsamples: int, max_length: int, batch_size: int,
                        seed: int, name: str, model=None, cache_dir: str | None = None) -> list[dict]:
    """`nsamples` examples of one calibration set, templated and batched."""
    src, examples = _calibration_examples(source_cfg, nsamples, seed, name)
    if src.self_distill:
        examples = self_distill_responses(model, tokenizer, examples, cache_dir=cache_dir)
    if any(ex.response is None for ex in examples):
        raise ConfigError(f"calibration set '{name}' ({src.path}) needs responses: set response: <field> or "
                          f"self_distill: true.")
    encoded = [encode_example(tokenizer, ex.messages, max_length) for ex in examples]
    return _batched(encoded, batch_size, tokenizer.pad_token_id)


def prompt_batches(tokenizer, source_cfg, nsamples: int, max_length: int, batch_size: int, seed: int,
                   name: str) -> list[dict]:
    """Prompts only, each ending with the assistant header (the decision position last); labels are all -100.
    Responses in the file are ignored; a long prompt loses its start, never its end."""
    _, examples = _calibration_examples(source_cfg, nsamples, seed, name)
    encoded = []
    for ex in examples:
        ids = tokenizer(prompt_text(tokenizer, ex.messages), add_special_tokens=False)["input_ids"][-max_length:]
        encoded.append(Encoded(ids, [IGNORE_INDEX] * len(ids)))
    return _batched(encoded, batch_size, tokenizer.pad_token_id)
