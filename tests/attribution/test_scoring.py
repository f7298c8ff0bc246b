"""Scoring: token positions (response / decision), SNIP without dropout, and every scorer end to end on a tiny
Llama with a planted safety unit."""

import json

import pytest
import torch
from conftest import compose

from safety_units.attribution.pipeline import run_attribution
from safety_units.units.classification import CLASS_CODES
from safety_units.data.chat import IGNORE_INDEX
from safety_units.utils.errors import ConfigError
from safety_units.models.loading import build_tiny, load_hf
from safety_units.attribution.scoring import score_units
from safety_units.units.unit_map import UnitMap
from safety_units.units.groups import resolve_units

MARKER = " Zyzzyva"  # a rare word: only the harmful prompts carry it
PLANT = 17           # the planted MLP unit of layer 1
REFUSE = " Sorry"    # the token the planted unit drives


# --------------------------------------------------------------------------- token positions
def _hand_batch():
    """Two right-padded rows: prompt 0-2, response 3-5 (row 0); prompt 0-1, response 2-3, padding (row 1)."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 0, 0, 0, 0]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 3:6] = ids[0, 3:6]
    labels[1, 2:4] = ids[1, 2:4]
    mask = torch.tensor([[1] * 8, [1, 1, 1, 1, 0, 0, 0, 0]])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _dense_activation(model, groups, batches, mask_of):
    """Reference: every unit's activation at the positions `mask_of(batch)` selects, kept densely."""
    acts = {g.key: [] for g in groups}
    hooks = [g.out_module.register_forward_pre_hook(
        lambda mod, args, key=g.key: acts[key].append(args[0].detach().clone())) for g in groups]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in hooks:
        h.remove()
    out = {}
    for g in groups:
        x = torch.cat([a[mask_of(b)] for a, b in zip(acts[g.key], batches)]).double()
        out[g.key] = x.abs().mean(0) * g.out_weight.param.detach().double().pow(2).sum(0).sqrt()
    return out


def test_response_tokens_are_the_positions_that_predict_the_response(tiny):
    model, groups, batch = tiny.model, resolve_units(tiny.model), _hand_batch()
    predicts = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    ours = score_units(model, groups, [batch], "activation", tokens="response", progress=False)
    ref = _dense_activation(model, groups, [batch], lambda b: predicts)
    for g in groups:  # the last prompt position counts, the last response token does not
        torch.testing.assert_close(ours[g.key].double(), ref[g.key], rtol=1e-4, atol=1e-10)


def test_decision_tokens_are_the_last_prompt_position_and_the_next_k(tiny):
    model, groups, batch = tiny.model, resolve_units(tiny.model), _hand_batch()
    prompt_only = {"input_ids": torch.tensor([[20, 21, 22, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]]),
                   "labels": torch.full((1, 4), IGNORE_INDEX)}
    decision = {id(batch): torch.tensor([[0, 0, 1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool),
                id(prompt_only): torch.tensor([[0, 0, 1, 0]], dtype=torch.bool)}  # prompt only: its last token
    ours = score_units(model, groups, [batch, prompt_only], "activation", tokens="decision", decision_tokens=1,
                       progress=False)
    ref = _dense_activation(model, groups, [batch, prompt_only], lambda b: decision[id(b)])
    for g in groups:
        torch.testing.assert_close(ours[g.key].double(), ref[g.key], rtol=1e-4, atol=1e-10)
    with pytest.raises(ConfigError, match="scoring.decision_tokens"):
        score_units(model, groups, [batch], "wifv", tokens="decision", decision_tokens=-1, progress=False)
    with pytest.raises(ConfigError, match="scoring.tokens"):
        score_units(model, groups, [batch], "wifv", tokens="prompt", progress=False)


# --------------------------------------------------------------------------- SNIP without dropout
def test_snip_runs_without_dropout_and_keeps_checkpointing():
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2(p):
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=100,
                                          resid_pdrop=p, embd_pdrop=p, attn_pdrop=p))

    model, plain = gpt2(0.1), gpt2(0.0)  # same weights; `plain` has no dropout at all
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 100, (3, 24), generator=g)
        labels = ids.clone()
        labels[:, :10] = IGNORE_INDEX
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    calls = []
    model.transformer.h[0].mlp.register_forward_pre_hook(lambda mod, args: calls.append(1))
    model.train()
    ours = score_units(model, resolve_units(model), batches, "snip", progress=False)
    assert len(calls) == 2 * len(batches)  # each forward is recomputed in backward: checkpointing still on
    assert model.training and all(m.training for m in model.modules())  # mode restored
    ref = score_units(plain, resolve_units(plain), batches, "snip", gradient_checkpointing=False, progress=False)
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------- a planted safety unit
def _plant(model, tokenizer, live: bool = True, refuse_norm: float | None = None, refuse_text: str = REFUSE,
           strength: float = 5.0):
    """Layer-0 attention copies a "marker seen" flag into hidden dim 1; MLP unit PLANT of layer 1 reads dim 1 and
    writes the embedding of REFUSE, so after a marker -- and at the decision position of a marked prompt -- the
    model says REFUSE. With live=False the unit reads nothing (the "base model" of the contrast scorer). In the random
    model REFUSE is then the argmax but barely likely (the final norm caps the write); `refuse_norm` (the mask test)
    scales REFUSE's tied embedding so that the planted unit makes it likely (p ~ 1) and nothing else does."""
    marker = tokenizer(MARKER, add_special_tokens=False)["input_ids"][2:]  # the rare pieces 'zzy', 'va'
    refuse = tokenizer(refuse_text, add_special_tokens=False)["input_ids"][0]
    inner = model.model
    with torch.no_grad():
        emb = inner.embed_tokens.weight
        emb[:, :2] = 0.0  # dims 0 and 1 are reserved: 0 = marker token, 1 = marker seen
        emb[marker, 0] = 4.0
        attn0 = inner.layers[0].self_attn
        attn0.v_proj.weight[0] = 0.0
        attn0.v_proj.weight[0, 0] = 1.0  # kv head 0, channel 0 reads dim 0 ...
        attn0.o_proj.weight[:2] = 0.0
        attn0.o_proj.weight[:, 0] = 0.0
        attn0.o_proj.weight[1, 0] = 3.0  # ... and head 0 writes its average over the prompt into dim 1
        inner.layers[0].mlp.down_proj.weight[:2] = 0.0
        inner.layers[1].self_attn.o_proj.weight[:2] = 0.0
        mlp = inner.layers[1].mlp
        for w in (mlp.gate_proj.weight, mlp.up_proj.weight):
            w[PLANT] = 0.0
            w[PLANT, 1] = 1.0 if live else 0.0
        direction = emb[refuse].clone()
        mlp.down_proj.weight[:, PLANT] = strength * direction / direction.norm()
        if refuse_norm is not None:
            emb[refuse] *= refuse_norm / emb[refuse].norm()
    return refuse


def _rows(marked: bool, n: int = 8):
    word = MARKER if marked else " plain"
    return [{"prompt": f"Request{word}{word} number {i}:{word} do it?", "response": f"I will not do thing {i}."}
            for i in range(n)]


@pytest.fixture
def planted_dirs(tmp_path, request):
    """A planted model and its base model saved as HF directories, and the calibration files (REFUSE's embedding
    norm: the test's indirect parameter, if it has one)."""
    cache = compose("attribute", ["model=tiny"]).paths.cache_dir
    refuse_norm, refuse_text, strength = getattr(request, "param", (None, REFUSE, 5.0))
    dirs = {}
    for name, live in (("aligned", True), ("base", False)):
        loaded = build_tiny(cache_dir=cache)
        _plant(loaded.model, loaded.tokenizer, live, refuse_norm, refuse_text, strength)
        loaded.model.save_pretrained(tmp_path / name)
        loaded.tokenizer.save_pretrained(tmp_path / name)
        dirs[name] = tmp_path / name
    for name, rows in (("safety", _rows(True)), ("utility", _rows(False)),
                       ("harmless", [{"prompt": r["prompt"]} for r in _rows(False)])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path, dirs


def test_the_planted_unit_decides_the_output(planted_dirs):
    from safety_units.data.chat import prompt_text

    _, dirs = planted_dirs
    loaded = load_hf(str(dirs["aligned"]))
    refuse = loaded.tokenizer(REFUSE, add_special_tokens=False)["input_ids"][0]

    def next_token(prompt):
        ids = loaded.tokenizer(prompt_text(loaded.tokenizer, [{"role": "user", "content": prompt}]),
                               add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return int(loaded.model(input_ids=ids).logits[0, -1].argmax())

    harmful, benign = _rows(True)[0]["prompt"], _rows(False)[0]["prompt"]
    assert next_token(harmful) == refuse and next_token(benign) != refuse
    with torch.no_grad():
        loaded.model.model.layers[1].mlp.down_proj.weight[:, PLANT] = 0.0  # zero the unit: it complies
    assert next_token(harmful) != refuse


def _attribute_cfg(root, dirs, *overrides):
    cal = []
    for which in ("safety", "utility", "harmless"):
        cal += [f"calibration.{which}.path={root / (which + '.jsonl')}", f"calibration.{which}.prompt=prompt"]
        if which != "harmless":
            cal += [f"calibration.{which}.input=null", f"calibration.{which}.response=response"]
    return compose("attribute", ["model=hf", f"model.path={dirs['aligned']}", *cal,
                                 "calibration.utility.hash_split=null", "calibration.batch_size=4",
                                 "calibration.max_length=96", *overrides], output_dir=root / "run")


SCORERS = {"wifv": [], "activation": [], "snip": [], "refusal_direction": [],
           "contrast": ["scoring.reference_path={base}"], "delta": ["scoring.reference_path={base}"], "atp": []}


@pytest.mark.parametrize("method", sorted(SCORERS))
def test_every_scorer_ranks_the_planted_unit_first(planted_dirs, method):
    root, dirs = planted_dirs
    extra = [o.format(base=dirs["base"]) for o in SCORERS[method]]
    out = run_attribution(_attribute_cfg(root, dirs, f"scoring={method}", *extra))
    um = UnitMap.load(out["unit_map"], model=load_hf(str(dirs["aligned"])).model)  # a valid map of this model
    mlp = torch.cat([um.safety[f"mlp.{layer}"] for layer in range(2)])
    assert int(mlp.argmax()) == 128 + PLANT  # first among all MLP units of all layers
    assert um.utility["mlp.1"][PLANT] == 0.0  # silent on benign data
    assert um.classes["mlp.1"][PLANT] == CLASS_CODES["esu"]
    assert um.metadata["scoring"]["method"] == method
    assert set(um.metadata["class_shares"]) == {"mlp", "attn"}


def test_refusal_direction_records_its_direction_norms(planted_dirs):
    root, dirs = planted_dirs
    run_attribution(_attribute_cfg(root, dirs, "scoring=refusal_direction"))
    meta = json.loads((root / "run" / "unit_map.json").read_text())["metadata"]
    norms = meta["refusal_direction_norms"]
    assert len(norms) == 2 and norms[1] > norms[0] > 0  # the planted unit adds its write to block 1's output
    assert set(meta["calibration"]) == {"safety", "utility", "harmless"}


def test_contrast_reference_must_be_a_different_model_of_the_same_shape(planted_dirs):
    root, dirs = planted_dirs
    with pytest.raises(ConfigError, match="scoring.reference: .*num_layers"):
        run_attribution(_attribute_cfg(root, dirs, "scoring=contrast", "model@scoring.reference=tiny",
                                       "scoring.reference.num_layers=3"))
    with pytest.raises(ConfigError, match="scoring.reference: .*units"):
        run_attribution(_attribute_cfg(root, dirs, "scoring=contrast", "model@scoring.reference=tiny",
                                       "scoring.reference.intermediate_size=64"))
    with pytest.raises(ConfigError, match="scoring.reference_path has the same weights"):
        run_attribution(_attribute_cfg(root, dirs, "scoring=contrast", f"scoring.reference_path={dirs['aligned']}"))
    with pytest.raises(ConfigError, match="scoring.reference_path=.*not a directory"):
        run_attribution(_attribute_cfg(root, dirs, "scoring=contrast", f"scoring.reference_path={root / 'nope'}"))
    with pytest.raises(ConfigError, match="same weights .* every delta score would be 0"):
        run_attribution(_attribute_cfg(root, dirs, "scoring=delta", f"scoring.reference_path={dirs['aligned']}"))


def test_delta_is_the_norm_of_each_units_weight_change():
    """scoring=delta by hand: a change on one unit's slices (gate/up rows, the down_proj column; an o_proj column)
    scores exactly that unit, with the L2 norm over all its slices; untouched units score 0."""
    from safety_units.attribution.delta import delta_scores

    cache = compose("attribute", ["model=tiny"]).paths.cache_dir
    ref, model = build_tiny(cache_dir=cache).model, build_tiny(cache_dir=cache).model
    mlp, attn = model.model.layers[0].mlp, model.model.layers[1].self_attn
    with torch.no_grad():
        mlp.gate_proj.weight[5] += 1.0   # 64 entries of +1
        mlp.down_proj.weight[:, 5] -= 2.0  # 64 entries of -2
        attn.o_proj.weight[:, 3] += 0.5  # 64 entries of +0.5
    scores = delta_scores(resolve_units(model), resolve_units(ref))
    torch.testing.assert_close(scores["mlp.0"][5], torch.tensor((64 * 1.0 + 64 * 4.0) ** 0.5))
    torch.testing.assert_close(scores["attn.1"][3], torch.tensor((64 * 0.25) ** 0.5))
    assert int((scores["mlp.0"] > 0).sum()) == 1 and int((scores["attn.1"] > 0).sum()) == 1
    assert all(float(v.abs().sum()) == 0.0 for k, v in scores.items() if k not in ("mlp.0", "attn.1"))


@pytest.mark.parametrize("method", ["refusal_direction", "atp"])
def test_harmless_prompts_are_required_where_a_scorer_contrasts_them(planted_dirs, method):
    root, dirs = planted_dirs
    with pytest.raises(ConfigError, match=f"scoring={method} needs calibration.harmless"):
        run_attribution(_attribute_cfg(root, dirs, f"scoring={method}", "calibration.harmless=null"))
    if method == "atp":
        with pytest.raises(ConfigError, match="scoring.metric must be one of"):
            run_attribution(_attribute_cfg(root, dirs, "scoring=atp", "scoring.metric=logits"))


# the planted unit says "Sorry" (a response's first token: sources strip the leading space) at p ~ 1, with a write
# small enough that the final norm does not saturate (a gate's gradient reaches it)
@pytest.mark.parametrize("planted_dirs", [(2.0, "Sorry", 0.3)], indirect=True)
@pytest.mark.parametrize("model", ["aligned", "base"])
def test_the_learned_mask_removes_the_planted_unit_and_nothing_without_a_safety_signal(planted_dirs, model):
    """scoring=mask on refusals that start with the planted unit's token ("Sorry", the decision window's one
    token): on the planted model the optimiser removes that unit -- first among all MLP units, and the only one; on
    its base model, which never says it, the refusal is already past the target, so the penalty keeps the mask
    empty."""
    root, dirs = planted_dirs
    rows = [{"prompt": r["prompt"], "response": f"Sorry, I will not do thing {i}."} for i, r in enumerate(_rows(True))]
    (root / "refusals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _attribute_cfg(root, dirs, "scoring=mask", f"calibration.safety.path={root / 'refusals.jsonl'}",
                         "scoring.decision_tokens=0", "scoring.steps=60", f"model.path={dirs[model]}")
    out = run_attribution(cfg)
    um = UnitMap.load(out["unit_map"])
    found = um.metadata["mask"]
    if model == "aligned":
        mlp = torch.cat([um.safety[f"mlp.{layer}"] for layer in range(2)])
        assert int(mlp.argmax()) == 128 + PLANT
        assert found["mask_units"] == {"attn": 0, "mlp": 1} and found["final"]["refusal_logodds"] < 0
        # the reached mask is saved for evaluate.py: ablate.selection zeroes exactly that unit
        from safety_units.attribution.selection import ablation_selection

        ecfg = compose("evaluate", ["model=hf", f"model.path={dirs[model]}", f"ablate.unit_map={out['unit_map']}",
                                    f"ablate.selection={root / 'run' / 'mask_units.safetensors'}"])
        sel, what = ablation_selection(ecfg, load_hf(str(dirs[model])).model, None)
        assert [(k, int(i)) for k, v in sel.items() for i in v.nonzero().flatten()] == [("mlp.1", PLANT)]
        assert what["units"]["mlp"]["units"] == 1
    else:
        assert found["mask_units"] == {"attn": 0, "mlp": 0} and found["final"]["removed_share"] < 0.01



def test_the_learned_mask_resumes_bit_identically(tmp_path):
    """An interrupted scoring=mask run (its state saved every 3 steps) continued to 6 steps in the same run dir
    ends exactly where an uninterrupted 6-step run does."""
    def run(out, steps):
        cfg = compose("attribute", ["model=tiny", "calibration.nsamples=8", "calibration.max_length=48",
                                    "scoring=mask", f"scoring.steps={steps}", "scoring.checkpoint_every=3"],
                      output_dir=out)
        return UnitMap.load(run_attribution(cfg)["unit_map"])

    whole = run(tmp_path / "whole", 6)
    run(tmp_path / "parts", 3)
    state = torch.load(tmp_path / "parts" / "mask_state.pt", weights_only=False)
    assert state["step"] == 3
    resumed = run(tmp_path / "parts", 6)
    assert all(torch.equal(whole.safety[k], resumed.safety[k]) for k in whole.keys)
    assert not all(torch.equal(whole.safety[k], run(tmp_path / "short", 3).safety[k]) for k in whole.keys)
    # a run resumed at its last step (nothing left to do) still reports the loss terms it ended with
    (tmp_path / "parts" / "unit_map.safetensors").unlink()
    done = run(tmp_path / "parts", 6)
    assert done.metadata["mask"]["final"] == resumed.metadata["mask"]["final"] != {}


@pytest.mark.parametrize("planted_dirs", [(2.0, "Sorry", 0.3)], indirect=True)
@pytest.mark.parametrize("method", ["atp", "mask"])
def test_with_heads_as_units_the_planted_marker_head_ranks_first(planted_dirs, method):
    """units.heads=true on the planted model (refusals that start with the planted token, as in the mask test):
    layer 0's head 0 is the only head that carries the marker into the residual stream, where the planted MLP unit
    reads it. atp ranks that head first among heads; the mask, free to remove any unit, takes the cheaper cut -- the
    one planted MLP unit, which breaks the refusal without touching the head's 15 other channels -- and no head."""
    root, dirs = planted_dirs
    rows = [{"prompt": r["prompt"], "response": f"Sorry, I will not do thing {i}."} for i, r in enumerate(_rows(True))]
    (root / "refusals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = ["scoring.steps=60"] if method == "mask" else []
    out = run_attribution(_attribute_cfg(root, dirs, f"scoring={method}", "units.heads=true", "scoring.decision_tokens=0",
                                         f"calibration.safety.path={root / 'refusals.jsonl'}", *extra))
    um = UnitMap.load(out["unit_map"], model=load_hf(str(dirs["aligned"])).model)
    heads = torch.cat([um.safety[f"head.{layer}"] for layer in range(2)])
    if method == "atp":
        assert int(heads.argmax()) == 0, heads
    else:
        mlp = torch.cat([um.safety[f"mlp.{layer}"] for layer in range(2)])
        assert int(mlp.argmax()) == 128 + PLANT and um.metadata["mask"]["mask_units"] == {"head": 0, "mlp": 1}
