"""Planted-unit models and calibration sets shared by the scorer tests (test_<scorer>.py, test_pipeline.py).

* `planted_dirs`: a tiny Llama whose MLP unit PLANT of layer 1 says REFUSE after a marker word, and its base model
  (the unit reads nothing), saved as HF directories, with safety / utility / harmless calibration files; with the
  indirect parameter "moe", a tiny Mixtral whose planted unit is a channel of one expert.
* `tiny_cfg`: attribute.yaml on model=tiny with small calibration files (`write_sets`) whose marker word appears only
  in the safety texts; `safety_batches`: that safety set's batches.
"""

import json

import pytest
import torch
from conftest import compose

from safety_units.data.calibration import calibration_batches
from safety_units.models.loading import build_tiny
from testkit import tiny_mixtral

MARKER = " Zyzzyva"  # a rare word: only the harmful prompts carry it
PLANT = 17           # the planted MLP unit (of layer 1 in planted_dirs)
REFUSE = " Sorry"    # the token the planted unit drives
# planted_dirs' parameter for the scorers that read the refusal's log-probability (mask, atp with heads): the unit
# says "Sorry" (a response's first token: sources strip the leading space) at p ~ 1, with a write small enough that
# the final norm does not saturate (a gate's gradient reaches it)
SORRY = (2.0, "Sorry", 0.3)


def plant(model, tokenizer, live: bool = True, refuse_norm: float | None = None, refuse_text: str = REFUSE,
          strength: float = 5.0):
    """Layer-0 attention copies a "marker seen" flag into hidden dim 1; MLP unit PLANT of layer 1 reads dim 1 and
    writes the embedding of REFUSE, so after a marker -- and at the decision position of a marked prompt -- the
    model says REFUSE. With live=False the unit reads nothing (the "base model" of the contrast scorer). In the random
    model REFUSE is then the argmax but barely likely (the final norm caps the write); `refuse_norm` (the mask test)
    scales REFUSE's tied embedding so that the planted unit makes it likely (p ~ 1) and nothing else does."""
    refuse = tokenizer(refuse_text, add_special_tokens=False)["input_ids"][0]
    inner = model.model
    with torch.no_grad():
        emb = _mark(inner, tokenizer)
        inner.layers[0].mlp.down_proj.weight[:2] = 0.0
        mlp = inner.layers[1].mlp
        for w in (mlp.gate_proj.weight, mlp.up_proj.weight):
            w[PLANT] = 0.0
            w[PLANT, 1] = 1.0 if live else 0.0
        direction = emb[refuse].clone()
        mlp.down_proj.weight[:, PLANT] = strength * direction / direction.norm()
        if refuse_norm is not None:
            emb[refuse] *= refuse_norm / emb[refuse].norm()
    return refuse


def _mark(inner, tokenizer) -> torch.Tensor:
    """Hidden dims 0 and 1 reserved: 0 = marker token, 1 = marker seen (layer-0 attention head 0 writes its average
    over the prompt there); layer 1's attention writes neither. Returns the embedding matrix."""
    marker = tokenizer(MARKER, add_special_tokens=False)["input_ids"][2:]  # the rare pieces 'zzy', 'va'
    emb = inner.embed_tokens.weight
    emb[:, :2] = 0.0
    emb[marker, 0] = 4.0
    attn0 = inner.layers[0].self_attn
    attn0.v_proj.weight[0] = 0.0
    attn0.v_proj.weight[0, 0] = 1.0  # kv head 0, channel 0 reads dim 0 ...
    attn0.o_proj.weight[:2] = 0.0
    attn0.o_proj.weight[:, 0] = 0.0
    attn0.o_proj.weight[1, 0] = 3.0  # ... and head 0 writes its average over the prompt into dim 1
    inner.layers[1].self_attn.o_proj.weight[:2] = 0.0
    return emb


# The MoE twin (planted_dirs' indirect parameter "moe"): a tiny Mixtral (4 experts, top-2, 32 channels each) whose
# layer-1 router sends marked tokens to expert PLANT_EXPERT, whose channel PLANT says REFUSE.
PLANT_EXPERT, MOE_UNITS = 2, 32  # tiny_mixtral's experts have 32 channels


def plant_expert(model, tokenizer, live: bool = True, strength: float = 5.0):
    """plant() on a Mixtral: the planted unit is channel PLANT of layer-1 expert PLANT_EXPERT (its gate and up rows
    read dim 1, its down column writes REFUSE), and layer 1's router sends every marked token there; layer 0's
    experts write nothing into dims 0 and 1. With live=False the channel reads nothing (routing unchanged)."""
    refuse = tokenizer(REFUSE, add_special_tokens=False)["input_ids"][0]
    inner = model.model
    with torch.no_grad():
        emb = _mark(inner, tokenizer)
        inner.layers[0].mlp.experts.down_proj[:, :2, :] = 0.0
        moe = inner.layers[1].mlp
        moe.gate.weight[:, 1] = 0.0
        moe.gate.weight[PLANT_EXPERT, 1] = 30.0  # marker seen -> this expert is in the top 2
        gate_up = moe.experts.gate_up_proj[PLANT_EXPERT]
        for row in (PLANT, MOE_UNITS + PLANT):  # its gate and up halves
            gate_up[row] = 0.0
            gate_up[row, 1] = 1.0 if live else 0.0
        direction = emb[refuse].clone()
        moe.experts.down_proj[PLANT_EXPERT, :, PLANT] = strength * direction / direction.norm()
    return refuse


def rows(marked: bool, n: int = 8):
    word = MARKER if marked else " plain"
    return [{"prompt": f"Request{word}{word} number {i}:{word} do it?", "response": f"I will not do thing {i}."}
            for i in range(n)]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def planted_dirs(tmp_path, request):
    """A planted model and its base model saved as HF directories, and the calibration files (REFUSE's embedding
    norm, text and the unit's write strength: the test's indirect parameter, if it has one)."""
    cache = compose("attribute", ["model=tiny"]).paths.cache_dir
    param = getattr(request, "param", (None, REFUSE, 5.0))
    refuse_norm, refuse_text, strength = (None, REFUSE, 5.0) if param == "moe" else param
    dirs = {}
    for name, live in (("aligned", True), ("base", False)):
        loaded = build_tiny(cache_dir=cache)
        if param == "moe":
            loaded.model = tiny_mixtral(loaded.tokenizer)
            plant_expert(loaded.model, loaded.tokenizer, live)
        else:
            plant(loaded.model, loaded.tokenizer, live, refuse_norm, refuse_text, strength)
        loaded.model.save_pretrained(tmp_path / name)
        loaded.tokenizer.save_pretrained(tmp_path / name)
        dirs[name] = tmp_path / name
    for name, records in (("safety", rows(True)), ("utility", rows(False)),
                          ("harmless", [{"prompt": r["prompt"]} for r in rows(False)])):
        write_jsonl(tmp_path / f"{name}.jsonl", records)
    return tmp_path, dirs


def sorry_refusals(root) -> str:
    """A safety set whose refusals start with "Sorry" (the planted token of SORRY): the decision window's token."""
    return write_jsonl(root / "refusals.jsonl", [{"prompt": r["prompt"], "response": f"Sorry, I will not do thing {i}."}
                                                 for i, r in enumerate(rows(True))])


def attribute_cfg(root, dirs, *overrides):
    """attribute.yaml on planted_dirs' aligned model and calibration files (run dir: root/run)."""
    cal = []
    for which in ("safety", "utility", "harmless"):
        cal += [f"calibration.{which}.path={root / (which + '.jsonl')}", f"calibration.{which}.prompt=prompt"]
        if which != "harmless":
            cal += [f"calibration.{which}.input=null", f"calibration.{which}.response=response"]
    return compose("attribute", ["model=hf", f"model.path={dirs['aligned']}", *cal,
                                 "calibration.utility.hash_split=null", "calibration.batch_size=4",
                                 "calibration.max_length=96", *overrides], output_dir=root / "run")


def write_sets(tmp_path) -> tuple[str, str]:
    """safety.jsonl (refusals with the marker word) and utility.jsonl (benign answers) in tmp_path."""
    safety = [{"prompt": f"Harmful request number {i}?", "response": f"No.{MARKER}{MARKER} I refuse{MARKER}."}
              for i in range(12)]
    utility = [{"prompt": f"Benign question number {i}?", "response": f"Sure, the answer is {i * 7} apples."}
               for i in range(12)]
    return write_jsonl(tmp_path / "safety.jsonl", safety), write_jsonl(tmp_path / "utility.jsonl", utility)


def tiny_cfg(tmp_path, *overrides):
    """attribute.yaml on model=tiny with write_sets' calibration files (run dir: tmp_path/run)."""
    s, u = write_sets(tmp_path)
    return compose("attribute", ["model=tiny", f"calibration.safety.path={s}", f"calibration.utility.path={u}",
                                 "calibration.safety.prompt=prompt", "calibration.safety.input=null",
                                 "calibration.safety.response=response", "calibration.utility.prompt=prompt",
                                 "calibration.utility.input=null", "calibration.utility.response=response",
                                 "calibration.utility.hash_split=null", "calibration.batch_size=4",
                                 "calibration.max_length=64", *overrides], output_dir=tmp_path / "run")


def safety_batches(tokenizer, tmp_path) -> list[dict]:
    """8 examples of write_sets' safety set in batches of 3 (the last one short)."""
    s, _ = write_sets(tmp_path)
    src = {"path": s, "prompt": "prompt", "response": "response"}
    return calibration_batches(tokenizer, src, nsamples=8, max_length=48, batch_size=3, seed=0, name="s")


def unit_inputs(model, groups, batches) -> dict[str, list[torch.Tensor]]:
    """Reference activations, kept densely: per unit group, each batch's input to its out module [batch, seq, n]."""
    acts = {g.key: [] for g in groups}
    hooks = [g.out_module.register_forward_pre_hook(
        lambda mod, args, key=g.key: acts[key].append(args[0].detach().clone())) for g in groups]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in hooks:
        h.remove()
    return acts
