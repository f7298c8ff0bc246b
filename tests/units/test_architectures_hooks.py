"""Everything that hooks modules by name, on every decoder layout of the tiny-model matrix (tests/testkit.py
ARCHS and MOE_ARCHS; plain token ids, vocab 128): the refusal direction's ablation hooks on the residual writers
(safety_units.steering.refusal_ablation), SCANS' block hooks (safety_units.steering.scans.ScansHooks) and the
learned mask scorer's per-unit gates (safety_units.attribution.mask.unit_gates), heads included where the layout
has head units."""

import copy

import pytest
import torch
from testkit import ARCHS as DENSE, HEADS, HIDDEN, MOE_ARCHS, VOCAB, arch_models, build_arch

from safety_units.attribution.mask import unit_gates
from safety_units.models.forward import forward_hooks
from safety_units.steering.refusal_ablation import AblationHooks, ablation_hook, residual_writers
from safety_units.models.forward import head_logits
from safety_units.steering.scans import ScansHooks, blocks_runner, final_norm
from safety_units.units.groups import resolve_units
from safety_units.units.layouts import decoder_layers, use_names
from safety_units.utils.errors import ConfigError
from safety_units.units.masking import ablate_units

ARCHS = DENSE | MOE_ARCHS
CASES = [(a, False) for a in ARCHS] + [(a, True) for a, spec in ARCHS.items() if spec[3]]
CASE_IDS = [f"{a}-{'heads' if h else 'channels'}" for a, h in CASES]
IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def built():
    """Each arch's tiny model in eval mode, built once per module (callers that change weights take a copy)."""
    with arch_models(prepare=lambda m: _randomize_norms(m).eval(), fresh_copy=False) as get:
        yield get


@torch.no_grad()
def _randomize_norms(model):
    """Norm weights and biases away from their initial 1 / 0, as in any trained checkpoint: a norm that scales its
    channels unevenly after a residual writer (Gemma-2's and OLMo-2's post-norms) then turns a removed direction
    back into the stream."""
    g = torch.Generator().manual_seed(8)
    for name, p in model.named_parameters():
        if "norm" in name.lower() or "ln_" in name:
            p.copy_(p + 0.5 * torch.randn(p.shape, generator=g))
    return model


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(input_ids=IDS, use_cache=False).logits


@torch.no_grad()
def _residuals(model, blocks_hooked: bool = False) -> list[torch.Tensor]:
    """The residual stream: the embedding output (hidden_states[0]) and every decoder block's output (read by a
    hook: a model's last hidden state is after its final norm). The other hidden states must be those blocks' --
    unless other hooks change the block outputs (`blocks_hooked`): transformers 5 captures hidden states by hooks
    of its own, registered on the first call, which run before any registered later."""
    blocks, seen = decoder_layers(model), {}

    def grab(i):
        def hook(module, args, output):
            seen[i] = (output[0] if isinstance(output, tuple) else output).clone()
        return hook
    with forward_hooks({b: grab(i) for i, b in enumerate(blocks)}):
        hidden = model(input_ids=IDS, use_cache=False, output_hidden_states=True).hidden_states
    for i in range(0 if blocks_hooked else len(blocks) - 1):
        torch.testing.assert_close(hidden[i + 1], seen[i], rtol=0, atol=0)
    return [hidden[0]] + [seen[i] for i in range(len(blocks))]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_directional_ablation_keeps_every_block_output_orthogonal_to_the_direction(arch, built):
    model = built(arch)
    writers = residual_writers(model)
    assert len(set(map(id, writers))) == len(writers) >= 1 + 2 * len(decoder_layers(model))
    r = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(6))
    r = r / r.norm()
    base = _logits(model)
    plain = _residuals(model)
    assert all(float((h @ r).abs().max()) > 1e-3 for h in plain)  # the direction is there to remove
    with forward_hooks({w: ablation_hook(r) for w in writers}):
        ablated = _residuals(model)
    for i, h in enumerate(ablated):
        assert float((h @ r).abs().max()) <= 1e-5 * float(h.abs().max()), f"{arch}: residual {i} keeps r"
    handles = AblationHooks(model, {"direction": r}).hooks()  # what steer=refusal_ablation installs
    try:
        steered = _logits(model)
        assert torch.equal(_residuals(model)[-1], ablated[-1])
    finally:
        for h in handles:
            h.remove()
    assert not torch.allclose(steered, base) and torch.equal(_logits(model), base)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_scans_block_hooks_shift_the_steered_block_and_leave_nothing_behind(arch, built, tokenizer):
    """ScansHooks on token ids (no assistant header in them: every position is steered): its decoder pre-hook
    classifies each row from block states, its block hook adds +-alpha * v to block 0's output."""
    model = built(arch)
    n = len(decoder_layers(model))
    g = torch.Generator().manual_seed(7)
    vectors = torch.nn.functional.normalize(torch.randn(n, HIDDEN, generator=g), dim=1)
    art = {"vectors": vectors, "reference": torch.randn(n, HIDDEN, generator=g), "compliance": [5]}
    setup = {"layers": [0], "sigma_layers": list(range(n)), "threshold": 0.0}
    base, plain = _logits(model), _residuals(model)
    installer = ScansHooks(model, tokenizer, art, setup, alpha=4.0, harmful_sign=1.0)
    handles = installer.hooks()
    try:
        steered, shifted = _logits(model), _residuals(model, blocks_hooked=True)
    finally:
        for h in handles:
            h.remove()
    assert len(installer.decisions) == 2 * len(IDS)  # both passes classified both rows
    sign = torch.where(torch.tensor(installer.decisions[-2:]), 1.0, -1.0)
    torch.testing.assert_close(shifted[1], plain[1] + 4.0 * sign[:, None, None] * vectors[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(steered, base) and torch.equal(_logits(model), base)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_scans_logit_lens_is_the_models_own_head_on_the_last_block(arch, built):
    """vocabulary_scores projects a block's vector through final_norm and the LM head: on the last block's output
    that must give the model's logits (GPT-2's ln_f, NeoX's / OPT's final_layer_norm, Phi's final_layernorm)."""
    model = built(arch)
    norm = final_norm(model)
    assert norm is not None
    with torch.no_grad():
        torch.testing.assert_close(head_logits(model, norm(_residuals(model)[-1])), _logits(model))




@pytest.mark.parametrize("arch,heads", CASES, ids=CASE_IDS)
def test_mask_gates_at_one_change_nothing_and_a_closed_gate_is_the_units_ablation(arch, heads, built):
    """OLMo-2 and OLMoE included: their q_norm / k_norm span every head, so a head's ablation leaves its q/k rows
    (zeroing them would move the other heads) and removes its write, as its gate does."""
    _gates_are_ablation(built(arch), HEADS if heads else None, exact=arch not in MOE_ARCHS)


@pytest.mark.parametrize("settings", [dict(new_decoder_architecture=True, num_kv_heads=2),  # Falcon-40B / 180B
                                      dict(multi_query=False)], ids=["grouped", "per_head"])
def test_falcons_other_fused_layouts_place_each_heads_rows(settings):
    """Falcon's two other q/k/v layouts (safety_units.units.heads): heads 0 and 1 of layer 1 gated equal those heads
    ablated -- their q rows and, where they form a whole key/value group, its k/v rows, found in place."""
    model = _randomize_norms(build_arch("falcon", settings=settings)).eval()
    _gates_are_ablation(model, HEADS, exact=True)


def _gates_are_ablation(model, names, exact: bool) -> None:
    """Gates at one change nothing (exact=False: within float error -- gates on experts run transformers' eager
    expert loop, not its grouped GEMMs); one unit per group gated to 0 -- heads 0 and 1 in layer 1, a whole
    key/value group under grouped-query attention -- equals those units ablated."""
    groups = resolve_units(model, names)
    base = _logits(model)
    with unit_gates(groups, lambda g: torch.ones(g.n)):
        if exact:
            assert torch.equal(_logits(model), base)
        else:
            torch.testing.assert_close(_logits(model), base, rtol=1e-5, atol=1e-6)
    sel = {g.key: torch.arange(g.n) == 1 + g.layer for g in groups}
    sel.update({g.key: torch.arange(g.n) < 2 for g in groups if g.kind == "head" and g.layer == 1})
    with unit_gates(groups, lambda g: (~sel[g.key]).float()):
        gated = _logits(model)
    ablated = copy.deepcopy(model)
    assert ablate_units(ablated, sel, names)["units_zeroed"] == sum(int(v.sum()) for v in sel.values())
    assert not torch.allclose(gated, base)
    torch.testing.assert_close(gated, _logits(ablated), rtol=1e-5, atol=1e-6)


def test_a_runs_units_names_reach_what_finds_blocks_without_the_config(built):
    """units.layouts.use_names binds a run's units.names to its model: SCANS' block runner, the refusal direction's
    residual writers and the decoder blocks follow it (here: a GPT-2 mapped by hand as if it had no table entry)."""
    model = copy.deepcopy(built("gpt2"))
    model.config.model_type = "my_gpt2"  # no table entry, no Llama layout
    with pytest.raises(ConfigError, match="no unit module names are known"):
        decoder_layers(model)
    use_names(model, {"layers": "transformer.h", "mlp": {"in": ["mlp.c_fc"], "out": "mlp.c_proj"},
                      "attn": {"in": [], "out": "attn.c_proj"}, "heads": True})
    assert decoder_layers(model) is model.transformer.h and blocks_runner(model) is model.transformer
    assert residual_writers(model)[-1] is model.transformer.h[1].mlp.c_proj
    assert [g.key for g in resolve_units(model)] == ["mlp.0", "attn.0", "mlp.1", "attn.1"]  # heads stay per call
