"""Block outputs at prompt positions: left padding changes nothing, the last position's logits are the model's."""

import pytest
import torch

from safety_units.steering.prompt_states import block_states, chat_ids, left_pad, token_ids
from safety_units.utils.errors import ConfigError


def test_left_pad_aligns_rows_at_their_end():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_block_states_are_padding_free_and_end_in_the_model_logits(tiny):
    tok = tiny.tokenizer
    rows = chat_ids(tok, ["Hi", "Write a long poem about the sea and the sky."])
    states, logits = block_states(tiny.model, rows, (-1, -2), tok.pad_token_id, batch_size=2, final=True)
    alone = block_states(tiny.model, rows[:1], (-1, -2), tok.pad_token_id)
    assert states.shape[:3] == (tiny.model.config.num_hidden_layers, 2, 2)
    assert torch.allclose(states[:, :1], alone, atol=1e-4)  # the short row, padded in the batch, read alone
    with torch.no_grad():
        full = tiny.model(input_ids=torch.tensor([rows[1]])).logits[0, -1]
    assert torch.allclose(logits[1], full, atol=1e-4)


def test_token_ids_are_first_tokens_deduplicated_and_empty_words_an_error(tokenizer):
    ids = token_ids(tokenizer, ["I", "I", " sorry"])
    assert ids == [tokenizer("I", add_special_tokens=False)["input_ids"][0],
                   tokenizer(" sorry", add_special_tokens=False)["input_ids"][0]]
    with pytest.raises(ConfigError, match="steer.refusal_tokens"):
        token_ids(tokenizer, [""])
