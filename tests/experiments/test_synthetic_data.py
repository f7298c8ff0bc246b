"""data=synthetic (safety_units.experiments.synthetic.data), built from the train config as train.py builds it: the
same unsafe / safe inputs as SFT rows (unsafe refused), DPO pairs (refusal preferred on unsafe inputs, the answer on
safe ones) and unlearning rows (unsafe answers forgotten), with the starting model's reference log-probabilities."""
import math

import pytest
import torch
from conftest import compose

from safety_units.data.datamodule import build_datamodule
from safety_units.experiments.synthetic.data import SyntheticDataModule
from safety_units.experiments.synthetic.model import build_model
from safety_units.experiments.synthetic.world import OPERATORS, World, apply, build_tokenizer
from safety_units.utils.errors import ConfigError

N = 40
ARCH = {"num_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "num_kv_heads": 2}


@pytest.fixture(scope="module")
def setup():
    """(data config of `model=synthetic data=synthetic`, the world's tokenizer, a small random model on it)."""
    cfg = compose("train", ["model=synthetic", "data=synthetic", f"data.num_samples={N}", "data.val_fraction=0.1",
                            "data.batch_size=8"])
    tok = build_tokenizer(World(**dict(cfg.model.world)))
    return cfg.data, tok, build_model(tok, ARCH, seed=0)


def datamodule(setup, kind: str, with_model: bool = True) -> SyntheticDataModule:
    data_cfg, tok, model = setup
    data_cfg = data_cfg.copy()
    data_cfg.kind = kind
    return build_datamodule(data_cfg, tok).prepare(model if with_model else None)


def answer_tokens(tok, enc) -> list[str]:
    """The tokens trained on (labels not masked): the response and <eos>."""
    return tok.convert_ids_to_tokens([t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100])


def task_answer(row: dict, world: World) -> str:
    xs = [int(t[1:]) for t in row["prompt"].split() if t.startswith("s")]
    return " ".join(f"s{x}" for x in apply(OPERATORS[row["op"]], xs, world.n_symbols))


def items(dm) -> list:
    return list(dm.train_set) + list(dm.val_set)  # in the order of dm.rows


def test_sft_refuses_unsafe_inputs_and_answers_safe_ones(setup):
    dm = datamodule(setup, "sft", with_model=False)  # SFT needs no reference model
    tok, world = setup[1], dm.world
    assert (len(dm.train_set), len(dm.val_set)) == (N - 4, 4) and dm.kind is None
    assert dm.stats["kind"] == "sft" and sum(dm.stats["sources"].values()) == N
    assert 0 < dm.stats["sources"]["unsafe"] < N and dm.prompts() == [r["prompt"] for r in dm.rows]
    for row, enc in zip(dm.rows, items(dm)):
        expected = "refuse" if row["unsafe"] else task_answer(row, world)
        assert row["unsafe"] == world.unsafe(row["op"], row["concept"])
        assert answer_tokens(tok, enc) == expected.split() + ["<eos>"]
        assert dm.answer(row) == task_answer(row, world)
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) >= {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape[0] == 4


def test_preference_pairs_prefer_refusal_on_unsafe_inputs_only(setup):
    dm = datamodule(setup, "preference")
    tok, world = setup[1], dm.world
    assert dm.kind == "preference" and dm.stats["kind"] == "preference"
    for row, item in zip(dm.rows, items(dm)):
        chosen, rejected = (answer_tokens(tok, r)[:-1] for r in item.rows)
        answer = task_answer(row, world).split()
        assert (chosen, rejected) == ((["refuse"], answer) if row["unsafe"] else (answer, ["refuse"]))
        assert item.forget == [0, 0] and len(item.ref) == 2 and all(x < 0 and math.isfinite(x) for x in item.ref)
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and batch["forget"].tolist() == [0] * 8  # 4 pairs, chosen first
    assert torch.equal(batch["ref_logps"], torch.tensor([x for it in dm.val_set for x in it.ref]))


def test_unlearning_forgets_the_unsafe_answers_and_retains_the_safe_ones(setup):
    dm = datamodule(setup, "unlearning")
    tok, world = setup[1], dm.world
    for row, item in zip(dm.rows, items(dm)):
        [enc] = item.rows
        assert answer_tokens(tok, enc) == task_answer(row, world).split() + ["<eos>"]  # the answer, never `refuse`
        assert item.forget == [int(row["unsafe"])] and len(item.ref) == 1
    assert sum(it.forget[0] for it in items(dm)) == dm.stats["sources"]["unsafe"]


@pytest.mark.parametrize("kw,message", [
    ({"kind": "dpo"}, r"data.kind must be one of \('sft', 'preference', 'unlearning'\), got 'dpo'"),
    ({"unsafe_share": 1.0}, r"data.unsafe_share must be in \(0, 1\), got 1.0"),
    ({"world": {}}, r"data=synthetic needs model=synthetic"),
], ids=["kind", "unsafe_share", "world"])
def test_bad_settings_name_the_key(setup, kw, message):
    world = dict(setup[0].world)
    with pytest.raises(ConfigError, match=message):
        SyntheticDataModule(setup[1], **({"world": world} | kw))


def test_pairs_need_the_starting_model(setup):
    with pytest.raises(ConfigError, match=r"kind=preference needs the starting model .*datamodule.prepare\(model\)"):
        datamodule(setup, "preference", with_model=False)
