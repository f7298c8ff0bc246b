"""Greedy decoding and self-distilled responses (safety_units.data.generation): batching, the response cache."""
import torch
from conftest import FIXTURES

from safety_units.data.datamodule import SFTDataModule
from safety_units.data.generation import generate


def test_batched_generation_equals_one_at_a_time(tiny):
    torch.manual_seed(0)
    with torch.no_grad():  # a peakier random model, so that greedy decoding produces varied text
        for p in tiny.model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    prompts = [tiny.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                  add_generation_prompt=True)
               for p in ["Hi", "Tell me a long story about a dragon and a knight", "What is 2+2?", "Name a colour"]]
    batched = generate(tiny.model, tiny.tokenizer, prompts, max_new_tokens=12, batch_size=4, progress=False)
    single = [generate(tiny.model, tiny.tokenizer, [p], max_new_tokens=12, batch_size=1, progress=False)[0]
              for p in prompts]
    assert batched == single
    assert all(len(tiny.tokenizer(b, add_special_tokens=False)["input_ids"]) >= 8 for b in batched)
    assert len(set(batched)) == 4


def test_self_distill_generates_once_and_caches(tiny, tmp_path):
    sources = {"p": {"path": str(FIXTURES / "prompts_object.json"), "prompt": "instructions", "response": None,
                     "self_distill": True}}
    dm = SFTDataModule(tiny.tokenizer, sources, val_fraction=0.0, cache_dir=str(tmp_path),
                       self_distill={"max_new_tokens": 6, "batch_size": 2}).prepare(tiny.model)
    files = list((tmp_path / "self_distill").glob("*.jsonl"))
    assert len(files) == 1 and len(files[0].read_text().splitlines()) == 3
    assert all(e.response for e in dm.train_examples)
    files[0].write_text(files[0].read_text().replace('"response": "', '"response": "CACHED '))
    dm2 = SFTDataModule(tiny.tokenizer, sources, val_fraction=0.0, cache_dir=str(tmp_path),
                        self_distill={"max_new_tokens": 6, "batch_size": 2}).prepare(tiny.model)
    assert all(e.response.startswith("CACHED") for e in dm2.train_examples)
