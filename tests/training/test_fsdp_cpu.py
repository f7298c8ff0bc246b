"""The FSDP masking path on CPU: real FSDP (gloo, full sharding; world size 1 and 2), outside Lightning (whose FSDP
strategy refuses the CPU). CausalLMModule's own hooks run in Lightning's order against a stand-in trainer that holds
Lightning's real FSDPStrategy and FSDPPrecision: the strategy wraps the LightningModule in one root FSDP module
(decoder layers auto-wrapped), masks attach by the unwrapped names even after wrapping, configure_optimizers sees
the wrapped (at world size 2: flat 1-D) parameters, clipping by norm goes through the root, and LoRA factors next to
a bf16 base flatten. Tensor hooks do not fire on FSDP's flat parameters, so masks act in forward; weight decay is
masked on the gathered parameters. One spawn per world size runs every check and returns a dict of results."""
import os
import socket
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CACHE = os.environ.get("SAFETY_UNITS_CACHE", str(Path.home() / ".cache" / "safety_units"))
CLIP = 0.05  # well under the tiny model's gradient norm, so clipping really scales the gradients
STEPS = 3


class _Trainer:
    """The Trainer fields CausalLMModule reads in setup, configure_optimizers and the optimizer-step hooks."""

    def __init__(self, strategy):
        from lightning.pytorch.utilities.enums import GradClipAlgorithmType

        self.strategy = strategy
        self.precision_plugin = strategy.precision_plugin  # Lightning's FSDPPrecision
        self.gradient_clip_val, self.gradient_clip_algorithm = CLIP, GradClipAlgorithmType.NORM
        self.max_steps = STEPS


def _wrap(module):
    """What Lightning's FSDPStrategy._setup_model does with trainer=fsdp (use_orig_params=True, CPU here)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return FSDP(module, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), use_orig_params=True,
                device_id=torch.device("cpu"))


def _masker(model, mechanism="auto", mode="freeze"):
    from safety_units.units.masking import Masker, masks_from_selection
    from safety_units.units.groups import resolve_units

    g = torch.Generator().manual_seed(0)
    selection = {grp.key: torch.rand(grp.n, generator=g) < 0.3 for grp in resolve_units(model)}
    return Masker(model, *masks_from_selection(model, selection, mode), mechanism=mechanism)


def _gather(root, model) -> dict:
    """The full parameters by unwrapped name (the export's full state dict; FSDP's FULL_STATE_DICT path segfaults
    on CPU with 2 ranks in torch 2.13, gathering the parameters is equivalent)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from safety_units.units.masking import live_params

    with FSDP.summon_full_params(root, writeback=False):
        return {n: p.detach().clone() for n, p in live_params(model).items()}


def _module(model, masker):
    """CausalLMModule with a stand-in trainer around Lightning's FSDPStrategy (its .model set once wrapped)."""
    from lightning.pytorch.strategies import FSDPStrategy

    from safety_units.models.module import CausalLMModule

    module = CausalLMModule(model, lr=1e-2, weight_decay=0.1, schedule="constant", masker=masker)
    module.trainer = _Trainer(FSDPStrategy())
    return module


def _train(module, root, opt, rank, steps=STEPS) -> list:
    """Lightning's automatic-optimization order: backward, on_after_backward, on_before_optimizer_step (masked decay),
    configure_gradient_clipping, optimizer.step. Returns the gradient norm (over all shards) before and after."""
    torch.manual_seed(rank)
    norms = []
    for _ in range(steps):
        ids = torch.randint(0, 1000, (2, 16))
        opt.zero_grad()
        root(input_ids=ids, labels=ids).loss.backward()
        module.on_after_backward()
        module.on_before_optimizer_step(opt)
        before = float(root.clip_grad_norm_(float("inf")))  # max_norm=inf: measures, scales by exactly 1
        module.configure_gradient_clipping(opt, gradient_clip_val=CLIP, gradient_clip_algorithm="norm")
        norms.append((before, float(root.clip_grad_norm_(float("inf")))))
        opt.step()
    return norms


def _lightning_run(rank, mode="freeze") -> dict:
    """trainer=fsdp freeze=esu_cu (mode freeze) or ru_only (train_only: embeddings, norms, q/k/v frozen, so the root
    FSDP unit gets no gradient): wrap, then setup (the attach after wrapping that raised KeyError), optimizer groups,
    training with masked decay and clipping, gathered export, one more masked decay checked entry by entry."""
    import lightning.pytorch as pl
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from safety_units.models.loading import build_tiny

    model = build_tiny(CACHE).model
    masker = _masker(model, mode=mode)
    module = _module(model, masker)
    root = module.trainer.strategy.model = _wrap(module)
    module.setup("fit")
    opt = module.configure_optimizers()["optimizer"]
    out = {"mechanism": masker.active_mechanism, "n_partial": len(masker.partial),
           "masked_decay": sum(len(g["params"]) for g in opt.param_groups if g.get("masked_weight_decay")),
           "decay": sum(len(g["params"]) for g in opt.param_groups if g["weight_decay"] > 0)}
    try:  # Lightning's default hook under FSDP: what crashed trainer=fsdp at the first optimizer step
        pl.LightningModule.configure_gradient_clipping(module, opt, gradient_clip_val=CLIP,
                                                       gradient_clip_algorithm="norm")
        out["default_clipping"] = "ran"
    except MisconfigurationException as e:
        out["default_clipping"] = str(e)
    out["norms"] = _train(module, root, opt, rank)
    sd = _gather(root, module.model)
    out["delta"], out["changed"] = masker.frozen_max_abs_delta(sd), masker.trainable_changed(sd)
    # Masked weight decay on the gathered parameters, alone: frozen entries untouched, trainable ones scaled.
    module.on_before_optimizer_step(opt)
    after = _gather(root, module.model)
    factor = 1.0 - opt.param_groups[0]["lr"] * 0.1
    frozen_same, scaled = True, True
    for n, m in masker.partial.items():
        frozen, keep = m.frozen_index(), m.trainable_index()
        frozen_same &= torch.equal(after[n].index_select(m.dim, frozen), sd[n].index_select(m.dim, frozen))
        a, b = after[n].index_select(m.dim, keep), sd[n].index_select(m.dim, keep)
        scaled &= not torch.equal(a, b) and torch.allclose(a, b * factor, rtol=1e-6, atol=0)
    out["decay_frozen_same"], out["decay_trainable_scaled"] = frozen_same, scaled
    return out


def _root_run(rank, mechanism) -> dict:
    """Masker.attach called on the FSDP root of the bare HF model (names `_fsdp_wrapped_module.`...)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from safety_units.models.loading import build_tiny

    from lightning.pytorch.strategies import FSDPStrategy

    model = build_tiny(CACHE).model
    masker = _masker(model, mechanism)
    strategy = FSDPStrategy()
    root = strategy.model = _wrap(model)
    masker.attach(root, strategy=strategy)
    masked = masker.partially_masked_params(root)
    params = [p for p in root.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if id(p) not in masked], "weight_decay": 0.1},
                             {"params": [p for p in params if id(p) in masked], "weight_decay": 0.0,
                              "masked_weight_decay": 0.1}], lr=1e-2)
    torch.manual_seed(rank)
    for _ in range(2):
        ids = torch.randint(0, 1000, (2, 16))
        opt.zero_grad()
        root(input_ids=ids, labels=ids).loss.backward()
        masker.apply_masked_weight_decay(opt, root, strategy)
        FSDP.clip_grad_norm_(root, CLIP)
        opt.step()
    sd = _gather(root, root)
    return {"delta": masker.frozen_max_abs_delta(sd), "changed": masker.trainable_changed(sd),
            "n_masked": len(masked)}


def _lora_run(rank) -> dict:
    """trainer=fsdp adapter=lora on a bf16 model: setup (before wrapping, as Lightning runs it) gives the fp32 LoRA
    factors the base dtype, so FSDP can flatten; the merged export keeps every frozen slice bit-identical."""
    from safety_units.models.lora import LoraAdapter
    from safety_units.models.loading import build_tiny

    model = build_tiny(CACHE, dtype="bfloat16").model
    masker = _masker(model)
    adapter = LoraAdapter(rank=4, alpha=8, dropout=0.0)
    model, lora_masker = adapter.wrap(model, masker)
    out = {"factor_dtypes_before": sorted({str(p.dtype) for n, p in model.named_parameters() if ".lora_" in n})}
    module = _module(model, lora_masker)
    module.setup("fit")
    root = module.trainer.strategy.model = _wrap(module)
    out["factor_dtypes"] = sorted({str(p.dtype) for n, p in model.named_parameters() if ".lora_" in n})
    opt = module.configure_optimizers()["optimizer"]
    _train(module, root, opt, rank, steps=2)
    weights = adapter.merged_state_dict(_gather(root, module.model))
    out["delta"], out["changed"] = masker.frozen_max_abs_delta(weights), masker.trainable_changed(weights)
    out["dtype"] = str(weights["model.layers.0.mlp.down_proj.weight"].dtype)
    return out


def _checks(rank, world) -> dict:
    out = {}
    runs = {"freeze": _lightning_run, "train_only": lambda r: _lightning_run(r, "train_only"),
            "root": lambda r: _root_run(r, "forward"), "lora": _lora_run}
    if world == 2:
        runs["hook"] = lambda r: _root_run(r, "hook")
    for name, run in runs.items():
        t0 = time.perf_counter()
        try:
            out[name] = run(rank)
            out[name]["seconds"] = round(time.perf_counter() - t0, 2)
        except Exception as e:  # noqa: BLE001 - reported to the test, which names it
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    return out


def _worker(rank: int, world: int, port: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _checks(rank, world)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        torch.save(result, out)


def _spawn(world: int, tmp) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp / f"world{world}.pt")
    mp.spawn(_worker, args=(world, port, out), nprocs=world, join=True)
    return torch.load(out)


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    """fsdp(world) -> the checks' results at that world size (one spawn each, shared by the tests)."""
    cache = {}

    def get(world: int) -> dict:
        if world not in cache:
            try:
                cache[world] = _spawn(world, tmp_path_factory.mktemp(f"fsdp{world}"))
            except mp.ProcessExitedException as e:
                # A rank killed by a signal is a native crash in CPU gloo/FSDP (once in CI, SIGABRT at world size 2;
                # not reproducible in 9 loaded local runs); Python errors are caught per check and fail the tests.
                # One fresh spawn on a new port; a second crash fails.
                if not e.signal_name:
                    raise
                warnings.warn(f"FSDP spawn at world size {world} died by {e.signal_name}; retrying once")
                cache[world] = _spawn(world, tmp_path_factory.mktemp(f"fsdp{world}_retry"))
        return cache[world]

    return get


def _ok(result: dict) -> dict:
    assert "error" not in result, result["error"]
    return result


WORLD = pytest.mark.parametrize("world", [1, 2])
MODE = pytest.mark.parametrize("mode", ["freeze", "train_only"])  # esu_cu-like; ru_only-like (frozen root unit)


@WORLD
@MODE
def test_fsdp_masks_attach_after_wrapping_and_stay_exact(fsdp, world, mode):
    """setup() after FSDP wrapped the LightningModule (trainer.validate after fit) used to raise KeyError; with the
    root unit frozen (train_only) under NO_SHARD (world size 1) the masked decay's gather used to fail."""
    r = _ok(fsdp(world)[mode])
    assert r["mechanism"] == "forward"
    assert r["delta"] == 0.0 and r["changed"]


@WORLD
def test_fsdp_attach_on_the_wrapped_root_stays_exact(fsdp, world):
    r = _ok(fsdp(world)["root"])
    assert r["n_masked"] > 0
    assert r["delta"] == 0.0 and r["changed"]


@WORLD
@MODE
def test_fsdp_masked_weight_decay_on_wrapped_parameters(fsdp, world, mode):
    """configure_optimizers runs on the wrapped (at world size 2: 1-D shard) parameters and still puts every
    partially masked weight in the masked-decay group; the decay scales trainable entries and leaves frozen ones."""
    r = _ok(fsdp(world)[mode])
    assert r["masked_decay"] == r["n_partial"] > 0
    if mode == "freeze":
        assert r["decay"] > 0  # embeddings and wholly trainable weights (under train_only all of them are frozen)
    assert r["decay_frozen_same"] and r["decay_trainable_scaled"]


@WORLD
@MODE
def test_fsdp_clipping_by_norm_goes_through_the_root(fsdp, world, mode):
    r = _ok(fsdp(world)[mode])
    assert "not supported" in r["default_clipping"]  # Lightning's FSDPPrecision refuses clipping by norm
    for before, after in r["norms"]:
        assert before > CLIP and after == pytest.approx(CLIP, rel=1e-3)


@WORLD
def test_fsdp_lora_factors_take_the_bf16_base_dtype_and_stay_exact(fsdp, world):
    r = _ok(fsdp(world)["lora"])
    assert r["factor_dtypes_before"] == ["torch.float32"]  # peft's autocast: what FSDP could not flatten
    assert r["factor_dtypes"] == ["torch.bfloat16"] and r["dtype"] == "torch.bfloat16"
    assert r["delta"] == 0.0 and r["changed"]


def test_fsdp_ignores_tensor_hooks(fsdp):
    """Why FSDP needs the forward mechanism: hooks on the original parameters never fire (2 ranks, full sharding)."""
    assert _ok(fsdp(2)["hook"])["delta"] > 0.0
