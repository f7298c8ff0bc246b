"""The chat template and label masking (safety_units.data.chat): labels cover the responses, truncation, padding."""
from conftest import FIXTURES
from testkit import src

from safety_units.data.chat import IGNORE_INDEX, collate, encode_example, prompt_text


def test_labels_cover_exactly_the_response(tokenizer):
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
    enc = encode_example(tokenizer, msgs, max_length=512)
    n_prompt = len(tokenizer(prompt_text(tokenizer, msgs), add_special_tokens=False)["input_ids"])
    assert enc.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:]
    assert tokenizer.decode(enc.input_ids[n_prompt:]) == "It is 4.<|im_end|>\n"
    assert tokenizer.decode(enc.input_ids).startswith("<|im_start|>system\n")


def test_multi_turn_labels_cover_every_assistant_turn(tokenizer):
    exs = src(path=str(FIXTURES / "conversations.json"), messages=".").load()
    enc = encode_example(tokenizer, exs[0].messages, max_length=512)
    spans, cur = [], []
    for tok, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE_INDEX:
            cur.append(tok)
        elif cur:
            spans.append(tokenizer.decode(cur))
            cur = []
    if cur:
        spans.append(tokenizer.decode(cur))
    assert spans == ["Hello.<|im_end|>\n", "Goodbye.<|im_end|>\n"]


def test_truncation_keeps_response_tokens(tokenizer):
    long_prompt = "word " * 300
    msgs = [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "short answer " * 20}]
    enc = encode_example(tokenizer, msgs, max_length=64, min_response_tokens=16)
    assert len(enc.input_ids) == 64 and enc.truncated_prompt and enc.truncated_response
    assert sum(lab != IGNORE_INDEX for lab in enc.labels) == 16
    enc2 = encode_example(tokenizer, [msgs[0] | {"content": "hi"}, msgs[1]], max_length=48)
    assert not enc2.truncated_prompt and enc2.truncated_response and len(enc2.input_ids) == 48


def test_collate_pads_right_with_ignored_labels(tokenizer):
    a = encode_example(tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], 64)
    b = encode_example(tokenizer, [{"role": "user", "content": "longer prompt here"},
                                   {"role": "assistant", "content": "and a longer answer too"}], 64)
    batch = collate([a, b], tokenizer.pad_token_id)
    n = len(a.input_ids)
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["attention_mask"][0, :n].all() and not batch["attention_mask"][0, n:].any()
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
