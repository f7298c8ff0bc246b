"""The training-objective defenses (Vaccine, Booster, Lisa), SafeInstr's data share, the defense= configs, and the
harmful fine-tuning protocol's data and FA task, on the tiny model."""

import copy
import math

import pytest
import torch
from conftest import SHARED_DATA, compose, train_cfg

from safety_units.defenses.objectives import Booster, Lisa, Vaccine, attention_modules, safeinstr_source

needs_data = pytest.mark.skipif(not (SHARED_DATA / "hft").is_dir(), reason="needs ../shared/data/hft")


class FakeModule:
    """What an objective reads from CausalLMModule: the model, and the run's length for Lisa's warm-up."""

    def __init__(self, model, total=10):
        self.model, self._total = model, total
        self.trainer = type("T", (), {"accumulate_grad_batches": 1})()

    def _total_steps(self):
        return self._total


class FixedStream:
    def __init__(self, batch):
        self.batch = batch

    def next(self, device):
        return self.batch


def batch_of(tiny, seed=0, n=2, length=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, tiny.model.config.vocab_size, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def grads_of(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def test_vaccine_rho_zero_is_the_plain_loss_and_hooks_are_removed(tiny):
    model = tiny.model.train()
    batch = batch_of(tiny)
    plain = model(**batch).loss
    v = Vaccine(rho=0.0)
    assert torch.allclose(v.loss(FakeModule(model), batch), plain)
    blocks = attention_modules(model)
    assert all(not b._forward_hooks for b in blocks)
    perturbed = Vaccine(rho=2.0).loss(FakeModule(model), batch)
    assert all(not b._forward_hooks for b in blocks)
    assert perturbed.item() > plain.item()  # the worst-case direction (gradient ascent) raises the loss


def test_vaccine_perturbs_along_the_normalised_activation_gradient(tiny):
    """The second pass equals a forward with rho * g / ||g|| added to every attention output by hand."""
    model = tiny.model.train()
    batch = batch_of(tiny, 1)
    blocks = attention_modules(model)
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o[0])) for b in blocks]
    loss = model(**batch).loss
    for h in hooks:
        h.remove()
    g = torch.autograd.grad(loss, outs)
    norm = torch.sqrt(sum((x ** 2).sum() for x in g))
    eps = {b: 2.0 * x / norm for b, x in zip(blocks, g)}
    hooks = [b.register_forward_hook(lambda m, i, o: (o[0] + eps[m], *o[1:])) for b in blocks]
    manual = model(**batch).loss
    for h in hooks:
        h.remove()
    assert torch.allclose(Vaccine(rho=2.0).loss(FakeModule(model), batch), manual, atol=1e-5)


def test_booster_term_has_the_papers_sign_and_gradient(tiny):
    """loss = L + lamb * (h(w) - h(w - alpha g/||g||)); the reduction is positive for a small step, and the
    gradient is grad L + lamb * (grad h(w) - grad h(w')) as in BoosterAlignmentTrainer."""
    model = tiny.model.train()
    align, harm = batch_of(tiny, 2), batch_of(tiny, 3)
    b = Booster(FixedStream(harm), lamb=5.0, alpha=0.1)
    loss = b.loss(FakeModule(model), align)
    assert b.last_terms["defense/harmful_loss_reduction"] > 0
    got = grads_of(model, loss)

    params = [p for p in model.parameters() if p.requires_grad]
    g_h = torch.autograd.grad(model(**harm).loss, params)
    norm = torch.sqrt(sum((x ** 2).sum() for x in g_h))
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for p, x in zip([p for p in shifted.parameters() if p.requires_grad], g_h):
            p -= 0.1 * x / norm
    g_shift = torch.autograd.grad(shifted(**harm).loss, [p for p in shifted.parameters() if p.requires_grad])
    g_align = torch.autograd.grad(model(**align).loss, params)
    for a, x, y, z in zip(got, g_align, g_h, g_shift):
        assert torch.allclose(a, x + 5.0 * (y - z), atol=1e-5)


def test_lisa_proximal_is_zero_at_the_aligned_weights_and_its_states_follow_the_code(tiny):
    model = tiny.model.train()
    lisa = Lisa(FixedStream(batch_of(tiny, 4)), rho=1.0, alignment_steps=1, finetune_steps=2, warmup_share=0.0)
    assert lisa.proximal(model).item() == 0.0  # both anchors are the loaded (aligned) weights
    with torch.no_grad():
        p = next(p for p in model.parameters() if p.requires_grad)
        p.add_(0.5)
    assert math.isclose(lisa.proximal(model).item(), 0.5 * 0.25 * p.numel(), rel_tol=1e-4)
    states = []
    for _ in range(6):  # ADMMTrainer.check_mode: alignment first, then 2 fine-tune steps, then 1 alignment, ...
        lisa.loss(FakeModule(model), batch_of(tiny, 5))
        states.append(lisa.state)
    assert states == ["alignment", "finetune", "finetune", "alignment", "finetune", "finetune"]


@pytest.mark.parametrize("defense", ["booster", "lisa", "vaccine"])
def test_masks_stay_exact_under_every_objective(tmp_path, defense):
    """A planted 5% set trains, the rest is frozen: every frozen entry is bit-identical after the defense's steps."""
    from safety_units.training.fit import run_train

    harmful = tmp_path / "harmful.jsonl"  # a few (prompt, harmful answer) pairs: the mechanism, not the data
    harmful.write_text("".join(f'{{"prompt": "how do I do bad thing {i}", "response": "step {i}: do it"}}\n'
                               for i in range(8)))
    extra = {"booster": [f"defense.harmful.beavertails.path={harmful}"],
             "lisa": ["defense.alignment_steps=1", "defense.finetune_steps=1", "defense.warmup_share=0"]}
    cfg = train_cfg(tmp_path, f"defense={defense}", "freeze=train_only", "freeze.random_share=0.05",
                    "optim.weight_decay=0.1", "trainer.accumulate_grad_batches=2", "export=false",
                    "trainer.max_steps=1", "data.num_samples=16", "data.max_length=32", "data.val_fraction=0",
                    *extra.get(defense, []))
    summary = run_train(cfg)
    assert summary["frozen_max_abs_delta"] == 0.0
    assert summary["trainable_changed"] > 0
    assert summary["defense"]["name"] == defense


@needs_data
def test_safeinstr_adds_its_share_of_safety_data(tmp_path):
    cfg = compose("train", ["~experiment", "data=task_mix", "data.num_samples=200", "defense=safeinstr"])
    name, src = safeinstr_source(cfg.defense, cfg.data)
    total = sum(float(s.weight) for s in cfg.data.sources.values()) + src["weight"]
    assert name == "safeinstr" and math.isclose(src["weight"] / total, 0.03)


def test_defense_configs_select_their_freeze_and_refuse_a_contradiction(tmp_path):
    from safety_units.utils.errors import ConfigError
    from safety_units.training.fit import run_train

    for d, strategy in {"esu": "esu", "esu_cu": "esu_cu", "random": "random", "layers": "layers",
                        "sn_tune": "train_only", "lisa": "none"}.items():
        cfg = compose("train", ["~experiment", f"defense={d}"])
        assert cfg.freeze.strategy == strategy, d
    assert compose("train", ["~experiment", "defense=sn_tune"]).freeze.classes == ["esu"]
    with pytest.raises(ConfigError, match="defense=esu_cu freezes with freeze=esu_cu"):
        run_train(train_cfg(tmp_path, "defense=esu_cu", "freeze=none"))


@needs_data
def test_task_mix_reads_sst2_with_label_words_and_the_harmful_share(tokenizer):
    from safety_units.data.datamodule import build_datamodule

    cfg = compose("train", ["~experiment", "data=task_mix", "data.num_samples=50", "data.harmful_share=0.2"])
    dm = build_datamodule(cfg.data, tokenizer).prepare()
    assert dm.stats["sources"] == {"task": 40, "harmful": 10}
    task = [ex for ex in dm.train_examples if ex.source == "task"]
    assert {ex.response for ex in task} <= {"positive", "negative"}
    assert task[0].messages[0]["content"].startswith("Analyze the sentiment of the input")
    # the eval task reads SST-2 validation with the same instruction and label words (FA = trained format)
    ev = compose("evaluate", ["eval=defense"]).eval.tasks.sst2.source
    assert ev.template == cfg.data.sources.task.template and dict(ev.labels) == dict(cfg.data.sources.task.labels)


def test_tsv_rows_split_on_the_last_tab_and_bad_labels_name_the_row(tmp_path):
    from safety_units.utils.errors import DataError
    from safety_units.data.sources import Source

    f = tmp_path / "t.tsv"
    f.write_text("sentence\tlabel\na \tb good \t1\nbad one \t0\n")
    ex = Source.from_config({"path": str(f), "prompt": "sentence", "response": "label",
                             "labels": {"0": "negative", "1": "positive"}}).load()
    assert [(e.prompt, e.response) for e in ex] == [("a \tb good", "positive"), ("bad one", "negative")]
    f.write_text("sentence\tlabel\nx \t7\n")
    with pytest.raises(DataError, match="row 1.*not one of the labels"):
        Source.from_config({"path": str(f), "prompt": "sentence", "response": "label", "labels": {"0": "n"}}).load()


def test_label_task_scores_the_label_words(tiny, tmp_path, monkeypatch):
    """FA by constrained scoring: the prediction is the label word with the highest log-likelihood after the
    chat-formatted prompt; accuracy and the majority floor follow."""
    from omegaconf import OmegaConf

    import safety_units.evaluation.multiple_choice as mc

    f = tmp_path / "dev.tsv"
    f.write_text("sentence\tlabel\n" + "".join(f"s{i} \t{int(i < 4)}\n" for i in range(6)))
    task = OmegaConf.create({"type": "label", "source": {"path": str(f), "prompt": "sentence", "response": "label",
                                                         "labels": {"0": "negative", "1": "positive"}}})
    settings = OmegaConf.create({"batch_size": 4, "seed": 0})
    real = mc.run_label("sst2", task, settings, tiny.model.eval(), tiny.tokenizer)[0]  # runs on a real model
    assert real.n == 6 and math.isclose(sum(real.extra["predicted_share"].values()), 1.0)
    asked = []

    def always_positive(model, tokenizer, pairs, **kw):
        asked.extend(pairs)
        return [0.0 if cont == "positive" else -1.0 for _, cont in pairs]

    monkeypatch.setattr(mc, "loglikelihoods", always_positive)
    res = mc.run_label("sst2", task, settings, tiny.model, tiny.tokenizer)[0]
    assert res.value == 4 / 6 and res.extra["majority"] == round(4 / 6, 4)
    assert res.extra["outcomes"] == [1, 1, 1, 1, 0, 0]
    assert asked[0][0].rstrip().endswith("assistant") and {c for _, c in asked} == {"positive", "negative"}
