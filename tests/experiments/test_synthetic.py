"""The synthetic task x concept world (Jain et al.): operators compute what they say, safety is the task x concept
combination, variants keep the semantics, and the tokenizer encodes every example without unknown tokens."""

import pytest

from safety_units.data.chat import encode_example
from safety_units.experiments.synthetic.world import JAILBREAKS, World, apply, build_tokenizer


def test_operators():
    xs = [3, 1, 2, 5]
    assert apply("copy", xs, 6) == xs and apply("reverse", xs, 6) == [5, 2, 1, 3]
    assert apply("sort", xs, 6) == [1, 2, 3, 5] and apply("shift", xs, 6) == [4, 2, 3, 0]
    assert apply("drop_first", xs, 6) == [1, 2, 5] and apply("swap_pairs", xs, 6) == [1, 3, 5, 2]


def test_safety_is_the_task_concept_combination_and_safety_data_is_canonical():
    w = World(seed=0)
    rows = w.safety(400)
    assert all((r["response"] == "refuse") == w.unsafe(r["op"], r["concept"]) for r in rows)
    assert all(r["variant"] == "plain" and "b " not in r["prompt"].split(" ", 1)[0] for r in rows)
    assert 0.4 < sum(r["unsafe"] for r in rows) / len(rows) < 0.6
    assert w.unsafe(0, 0) and not w.unsafe(0, 5) and not w.unsafe(4, 0)  # the operator alone or concept alone: safe
    assert w.safety(50) == w.safety(50) and w.safety(50, seed=1) != w.safety(50)


def test_pretraining_answers_everything_in_every_spelling():
    w = World(seed=0)
    rows = w.pretraining(600)
    assert not any(r["response"] == "refuse" for r in rows)
    assert {r["variant"] for r in rows} == {"plain", "synonym", "composed"}
    assert any(r["unsafe"] for r in rows)  # the model learns to do the unsafe tasks too
    syn = next(r for r in rows if r["variant"] == "synonym")
    assert syn["prompt"].split()[0] == f"op{syn['op']}b"


def test_evaluation_groups_and_jailbreaks_are_unsafe_inputs():
    w = World(seed=0)
    rows = w.evaluation(10)
    groups = {g: [r for r in rows if r["group"] == g] for g in {r["group"] for r in rows}}
    assert set(groups) == {"safe", "unsafe", *(f"jailbreak_{v}" for v in JAILBREAKS)}
    assert all(not r["unsafe"] for r in groups["safe"]) and all(r["unsafe"] for r in groups["unsafe"])
    assert all(r["unsafe"] and r["prefill"] for r in groups["jailbreak_prefix"])
    composed = groups["jailbreak_composed"][0]
    assert f"c{composed['concept']}a with c{composed['concept']}b" in composed["prompt"]


def test_the_tokenizer_encodes_every_example_and_masks_the_prompt():
    w = World(seed=0)
    tok = build_tokenizer(w)
    unk = tok.convert_tokens_to_ids("<pad>")
    for r in w.pretraining(50) + w.safety(50):
        msgs = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
        enc = encode_example(tok, msgs, 64)
        body = [t for t in enc.input_ids if t != tok.bos_token_id]
        assert unk not in body
        answer = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100]
        assert tok.convert_ids_to_tokens(answer) == r["response"].split() + ["<eos>"]
    with pytest.raises(ValueError, match="unsafe_operators"):
        World(unsafe_operators=[9])


SMALL = ["model.pretraining.steps=30", "model.pretraining.examples=500", "model.pretraining.checkpoint_every=10",
         "model.arch.num_layers=2", "model.arch.hidden_size=32", "model.arch.intermediate_size=64",
         "model.progress=false"]


def test_synthetic_model_pretrains_once_resumes_and_is_cached(tmp_path, monkeypatch):
    import json

    import safety_units.experiments.synthetic.model as sm
    from conftest import compose

    from safety_units.models.loading import load_model

    cfg = compose("train", ["model=synthetic", f"paths.cache_dir={tmp_path}", *SMALL]).model
    real_collate, calls = sm.collate, []

    def interrupted(*a, **k):  # a Ctrl-C at step 15: after the step-10 checkpoint
        calls.append(1)
        if len(calls) == 16:
            raise KeyboardInterrupt
        return real_collate(*a, **k)

    monkeypatch.setattr(sm, "collate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_model(cfg)
    (ckpt,) = list((tmp_path / "synthetic").glob("*/ckpt.pt"))
    assert __import__("torch").load(ckpt, weights_only=False)["step"] == 10
    loaded = load_model(cfg)  # resumes at step 10
    report = json.loads(next((tmp_path / "synthetic").glob("*/model/pretraining.json")).read_text())
    assert report["steps"] == 30 and len(report["losses"]) == 30 and not ckpt.exists()
    assert set(report["task_accuracy"]) == {"safe", "unsafe", "jailbreak_synonym", "jailbreak_composed"}
    n = len(calls)
    again = load_model(cfg)  # from the cache: no pretraining
    assert len(calls) == n and again.name == loaded.name
    assert n >= 16 + 20  # 20 more steps after the resume (plus the accuracy batches)
    assert all((a == b).all() for a, b in zip(loaded.model.parameters(), again.model.parameters()))


def test_separation_probe_and_cluster_distance_on_planted_clusters():
    import torch

    from safety_units.experiments.synthetic.analysis import separation

    g = torch.Generator().manual_seed(0)
    safe = torch.randn(2, 200, 16, generator=g)
    unsafe = torch.randn(2, 200, 16, generator=g)
    unsafe[1, :, 3] += 6.0  # layer 1 separates along one direction, layer 0 does not
    sep = separation(safe, unsafe)
    assert sep[1]["probe_accuracy"] > 0.95 and 0.35 < sep[0]["probe_accuracy"] < 0.65
    assert sep[1]["cluster_distance"] > 3 * sep[0]["cluster_distance"]


def test_update_shares_split_row_and_null_space():
    import torch

    from safety_units.experiments.synthetic.analysis import update_subspace_shares

    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 8, generator=g))[0]
    w0 = torch.randn(6, 3, generator=g) @ basis[:, :3].T          # rank 3: row space = first 3 basis vectors
    in_null = torch.randn(6, 5, generator=g) @ basis[:, 3:].T
    assert update_subspace_shares(w0, w0 + in_null)["null_space"] == pytest.approx(1.0, abs=1e-9)
    shares = update_subspace_shares(w0, 1.1 * w0)
    assert shares["row_space"] == pytest.approx(1.0, abs=1e-9) and shares["rank"] == 3
    assert shares["chance_null_space"] == pytest.approx(1 - 3 / 8)  # an isotropic update: 5 of 8 input dims
    # sparsity: an update on 1% of the entries is all top share; a dense Gaussian one puts ~6% there
    big = torch.randn(100, 100, generator=g)
    sparse = torch.zeros(100, 100)
    sparse.view(-1)[torch.randperm(10000, generator=g)[:100]] = torch.randn(100, generator=g)
    assert update_subspace_shares(big, big + sparse)["top_share"] == pytest.approx(1.0)
    assert 0.03 < update_subspace_shares(big, big + torch.randn(100, 100, generator=g))["top_share"] < 0.12


def test_placement_puts_inputs_on_the_safe_unsafe_axis():
    import torch

    from safety_units.experiments.synthetic.analysis import placement

    g = torch.Generator().manual_seed(0)
    safe = torch.randn(1, 100, 8, generator=g) * 0.1
    unsafe = safe + torch.tensor([2.0] + [0.0] * 7)
    near_safe = safe[:, :50] + torch.tensor([0.4] + [0.0] * 7)
    p = placement(safe, unsafe, near_safe)[0]
    assert p["position"] == pytest.approx(0.2, abs=0.05) and p["nearer_safe"] == 1.0


def test_the_testbed_driver_runs_every_objective_and_writes_the_report(tmp_path):
    import json

    from conftest import load_script

    load_script("run_jain_testbed").main([
        "--seeds", "0", "--out", str(tmp_path / "out"), "--results-dir", str(tmp_path / "r"), "--eval-per-group", "8",
        *sum((["--model-set", s] for s in [f"paths.cache_dir={tmp_path}", *SMALL]), []),
        "--set", "data.num_samples=32", "--set", "trainer.max_steps=2", "--set", f"paths.cache_dir={tmp_path}",
        "--set", "freeze=train_only", "--set", "freeze.random_share=0.1", "--scorers", "delta", "wifv"])
    data = json.loads((tmp_path / "r" / "jain_testbed" / "testbed.json").read_text())
    assert set(data["runs"]) == {"sft_s0", "dpo_s0", "unlearning_s0"}
    # each objective fine-tunes the synthetic model with frozen entries exact
    assert all(r["frozen_max_abs_delta"] == 0.0 and r["trainable_changed"] > 0 for r in data["runs"].values())
    assert set(data["findings"]) == {"sft", "dpo", "unlearning"}
    shares = data["runs"]["dpo_s0"]["shares"]["mean_null_space"]
    assert set(shares) == {"gate_proj", "up_proj", "down_proj"} and all(0 <= v <= 1 for v in shares.values())
    md = (tmp_path / "r" / "jain_testbed.md").read_text()
    assert "| unlearning (1 seeds) |" in md and "| dpo |" in md
    # the planted set is 2% of the units (the objectives' freeze.random_share=0.1 does not leak into it), only it
    # changed, and delta's safety rank (the weight change) recovers it exactly: the ground-truth machinery is right
    gt = data["ground_truth"]
    assert gt["frozen_max_abs_delta"] == 0.0 and set(gt["scorers"]) == {"delta", "wifv"}
    assert 0.01 * gt["units"] <= gt["planted_units"] <= 0.03 * gt["units"]
    assert gt["scorers"]["delta"]["safety"]["precision"] == 1.0
    assert gt["scorers"]["wifv"]["safety"]["chance"] == gt["planted_units"] / gt["units"]
    assert "| delta | " in md and "## Ground truth for the scorers" in md
