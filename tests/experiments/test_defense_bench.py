"""The defense benchmark v2: its plan composes real configs and grows phase by phase from the choices its rules make
on validation data; the rules (fixed before the runs) behave as stated; the report is rebuilt from its cells."""

import json
import random
import shutil

import pytest
from conftest import ROOT

from safety_units.experiments.defense_bench import criteria as C
from safety_units.experiments.defense_bench import plan as P
from safety_units.experiments.defense_bench import tuning as T
from safety_units.experiments.defense_bench.cells import HS_RULE

CPU = P.SCALES["cpu"]


def test_grids_come_from_the_defense_configs_own_value_first():
    assert T.grid_points("none") == {"": []}
    vaccine = T.grid_points("vaccine")
    assert list(vaccine)[0] == "rho2.0" and vaccine["rho0.5"] == ["defense.rho=0.5"]
    lisa_ofat, lisa_full = T.grid_points("lisa", "ofat"), T.grid_points("lisa", "full")
    assert list(lisa_ofat) == ["rho1.0-alignment_share0.1", "rho0.1-alignment_share0.1", "rho1.0-alignment_share0.3"]
    assert len(lisa_full) == 4 and set(lisa_ofat) < set(lisa_full)
    assert list(T.grid_points("booster", "paired")) == ["lamb5.0-alpha0.1", "lamb1.0-alpha0.01"]
    assert list(T.grid_points("lisa", "paired")) == ["rho1.0-alignment_share0.1", "rho0.1-alignment_share0.3"]
    assert T.grid_points("vaccine", "paired") == T.grid_points("vaccine", "ofat")  # one axis: the same points
    with pytest.raises(Exception, match="grid mode"):
        T.grid_points("lisa", "random")


def test_the_tuning_phase_then_the_attack_and_test_phases_once_chosen(tmp_path):
    stages = P.plan(CPU, str(tmp_path))
    names = [s.name for s in stages]
    assert len(names) == len(set(names)) and names[:2] == ["align_sft_s0", "attribute_s0"]
    kinds = [s.kind for s in stages]
    assert kinds.index("train_eval") > max(i for i, k in enumerate(kinds) if k == "align")  # alignments first
    assert all(s.labels.get("seed") in (0, None) for s in stages)  # tuning: seed 0 only
    for d in P.DEFENSES:
        if d not in P.CONTROLS:
            assert {P.ft_name(P.PROTOCOL, d, t, 0) for t in T.grid_points(d, CPU.grid)} <= set(names), d
    assert not any(n.startswith(("post_proto_random_prune", "ft_proto_random_", "ft_lr2x")) for n in names)
    picks = {d: T.default_tag(d) for d in P.DEFENSES if d not in P.CONTROLS}
    grown = {s.name: s for s in P.plan(CPU, str(tmp_path), {"settings": picks})}
    post = grown["post_lr2x_random_prune_dense_ratio0.1_s0"] if "post_lr2x_random_prune_dense_ratio0.1_s0" in grown \
        else next(s for n, s in grown.items() if n.startswith("post_lr2x_random_prune"))
    assert post.kind == "posthoc" and post.model == "ft_lr2x_none_s0" and post.reference == "align_sft_s0"
    shrink = grown["post_lora_shrink_lisa_s0"]
    lisa = P.ft_name("lora", "lisa", picks["lisa"], 0)
    assert f"{lisa}/point.json" in shrink.needs and any(f"defense.norm_of={tmp_path}/{lisa}/point.json" == o
                                                        for o in shrink.train)
    worst = {d: "lr2x" for d in [*picks, *P.CONTROLS]}
    final = {s.name: s for s in P.plan(CPU, str(tmp_path), {"settings": picks, "worst_attack": worst})}
    b2 = final[P.ft_name("lr2x", "booster", picks["booster"], 2)]
    assert b2.model == P.align_name("booster", picks["booster"], 2)  # seed k starts from alignment seed k
    assert final[P.ft_name(P.PROTOCOL, "esu_cu", picks["esu_cu"], 1)].needs[-1] == "attribute_s1/unit_map.safetensors"
    assert "ft_lora_none_s1" not in final and "ft_lr2x_none_s2" in final
    pos = {n: i for i, n in enumerate(final)}  # no worker takes a stage whose producer is queued behind it
    assert all(pos[up] < pos[s.name] for s in final.values()
               for up in {s.model, *(n.split("/")[0] for n in s.needs)} & final.keys())
    assert pos["align_sft_s2"] < pos["attribute_s1"]  # the long, independent stages first
    # a defense whose grid has no eligible setting stops after tuning; its control still runs beside it at seed 0
    failing = {d: {"setting": t, "eligible": d not in ("esu_cu", "lisa")} for d, t in picks.items()}
    cut = {s.name for s in P.plan(CPU, str(tmp_path), {"settings": picks, "worst_attack": worst, "tuning": failing})}
    assert P.ft_name(P.PROTOCOL, "random", picks["esu_cu"], 0) in cut and "post_proto_shrink_lisa_s0" not in cut
    assert not any(n.startswith(("ft_lr2x_esu_cu", "ft_lr2x_random", "ft_lr2x_lisa")) or n.endswith("_s1") and
                   ("esu_cu" in n or "lisa" in n or "_random_total" in n) for n in cut)
    assert final.keys() - cut and cut < set(final) and P.ft_name("lr2x", "vaccine", picks["vaccine"], 1) in cut


def test_every_kind_of_stage_composes(tmp_path):
    from safety_units.experiments.study.runner import stage_configs

    picks = {d: T.default_tag(d) for d in P.DEFENSES if d not in P.CONTROLS}
    stages = {s.name: s for s in P.plan(CPU, str(tmp_path), {"settings": picks, "worst_attack": {}})}
    want = ["align_sft_s0", "align_booster_s0" if "align_booster_s0" in stages else P.align_name(
        "booster", picks["booster"], 0), P.align_name("sn_tune", "", 0), P.ft_name("lora", "lisa", picks["lisa"], 0),
        P.ft_name(P.PROTOCOL, "random", picks["esu_cu"], 0), P.ft_name(P.PROTOCOL, "safelora", picks["safelora"], 0),
        "post_proto_shrink_antidote_s0", "ft_benign_none_s0", P.ft_name(P.PROTOCOL, "vaccine", "rho0.5", 0)]
    for name in want:
        cfgs = stage_configs(stages[name], tmp_path, CPU, [])
        ev = cfgs["evaluate"].eval.tasks
        assert ev.beavertails.source.hash_split == [0.75, 1.0] and ev.beavertails_val.source.hash_split == [0.5, 0.75]
        assert ev.sst2.limit is None and ev.sst2_val.source.hash_split == [0.98, 1.0]
        t = cfgs["train"]
        if name.startswith(("ft_", "post_")):
            assert t.data.sources.task.hash_split == [0.0, 0.98] and t.data.harmful_share == (
                0.0 if "benign" in name else 0.1)
    lisa = stage_configs(stages[P.ft_name("lora", "lisa", picks["lisa"], 0)], tmp_path, CPU, [])["train"]
    assert lisa.defense.cycles == CPU.lisa_cycles and lisa.adapter.rank == 16 and lisa.optim.lr == 4e-3
    vac = stage_configs(stages[P.ft_name(P.PROTOCOL, "vaccine", "rho0.5", 0)], tmp_path, CPU, [])["train"]
    assert vac.defense.name == "none" and vac.model.path.endswith("align_vaccine_rho0.5_s0/model")
    assert stage_configs(stages[P.align_name("vaccine", "rho0.5", 0)], tmp_path, CPU, [])["train"].defense.rho == 0.5
    rnd = stage_configs(stages[P.ft_name(P.PROTOCOL, "random", picks["esu_cu"], 0)], tmp_path, CPU, [])["train"]
    assert rnd.freeze.strategy == "random" and rnd.freeze.like == "esu_cu"
    shrink = stage_configs(stages["post_proto_shrink_antidote_s0"], tmp_path, CPU, [])["train"]
    assert shrink.defense.name == "shrink" and shrink.defense.norm_of.endswith("/point.json")


# --------------------------------------------------------------------------- the rules
def cell(defense, seed, harmful, fa=0.8, attack="proto", setting="", val=None, val_fa=None, hash_="h", **kw):
    split = {"harmful": harmful, "fa": fa, "fa_majority": 0.5, "prompt_hash": hash_, "asr": sum(harmful) / len(harmful),
             "overrefusal": 0.1, "ppl": 5.0}
    v = dict(split, harmful=val if val is not None else harmful, fa=val_fa if val_fa is not None else fa)
    return {"stage": f"ft_{attack}_{defense}_{setting}_s{seed}", "claim": "finetune", "phase": "tune",
            "attack": attack, "defense": defense, "setting": setting, "seed": seed, "role": None, "test": split,
            "val": v, "delta_norm": 1.0, "train_seconds": 10.0, **kw}


def ones(k, n=50):
    return [1] * k + [0] * (n - k)


def test_the_tuning_rule_keeps_fa_and_rejects_harmful_alignments():
    sft = cell("none", 0, ones(30), val_fa=0.80)
    grid = [cell("x", 0, ones(20), setting="a", val_fa=0.79), cell("x", 0, ones(10), setting="b", val_fa=0.70),
            cell("x", 0, ones(15), setting="c", val_fa=0.785)]
    r = C.choose_setting(grid, sft, default="a")
    assert r["setting"] == "c" and r["eligible"]  # b is lowest but costs 10 points of FA
    assert C.choose_setting(grid, sft, {"c": True}, default="a")["setting"] == "a"
    assert C.choose_setting(grid[:2], sft, {"a": True}, default="a") | {} and not C.choose_setting(
        grid[:2], sft, {"a": True}, default="a")["eligible"]
    tie = [cell("x", 0, ones(20), setting="a"), cell("x", 0, ones(20), setting="b")]
    assert C.choose_setting(tie, sft, default="b")["setting"] == "b"
    aligned, sft_al = cell("booster", 0, ones(20)), cell("none", 0, ones(2))
    assert C.aligned_rejected(aligned, sft_al)["rejected"] and not C.aligned_rejected(sft_al, aligned)["rejected"]
    attacks = [cell("x", 0, ones(10)), cell("x", 0, ones(40), attack="lr2x", val_fa=0.4),
               cell("x", 0, ones(20), attack="lora")]
    assert C.worst_attack(attacks, "proto")["attack"] == "lora"  # lr3x does not learn the task: FA <= floor


def test_seed_level_comparisons_and_the_answer_to_the_user():
    rng = random.Random(0)
    cells = []
    for s in range(3):
        cells += [cell("none", s, ones(30)), cell("good", s, ones(15), fa=0.79),
                  cell("costly", s, ones(5), fa=0.70), cell("noisy", s, rng.sample(ones(30), 50))]
    t = C.compare(cells, "good", "none", "proto")
    assert t["diff"] == pytest.approx(-0.3) and t["ci"][1] < 0 and t["seeds"] == [0, 1, 2]
    assert t["mcnemar_p_seed"] < 0.01
    rec = C.recommend(cells, {"good": "proto", "costly": "proto", "noisy": "proto"}, "proto")
    assert rec["defense"] == "good" and rec["eligible"] == ["good"]  # costly pays 10 points of FA
    assert rec["why"]["costly"]["fails"].startswith("FA cost") and rec["why"]["good"]["fails"] is None
    assert rec["why"]["noisy"]["fails"].startswith("HS not below")
    shrunk = cells + [{**c, "defense": "shrink_good"} for c in cells if c["defense"] == "good"]
    assert C.recommend(shrunk, {"good": "proto", "shrink_good": "proto"}, "proto")["eligible"] == ["good"]  # a control
    ctl = cells + [{**c, "defense": "random_good"} for c in cells if c["defense"] == "good"]
    assert C.recommend(ctl, {"random_good": "proto"}, "proto", ("random_good",))["defense"] is None
    one_seed = [c for c in cells if c["seed"] == 0]
    assert C.recommend(one_seed, {"good": "proto"}, "proto")["defense"] is None  # no seed-level interval
    g = C.goal(cells, "good", "proto", ["costly"])
    assert g["hs_drop"] == pytest.approx(0.3) and g["hs_drop_met"] and g["fa_met"] and g["worse_than"] == ["costly"]
    assert not g["met"]  # costly (a peer) is significantly less harmful
    with pytest.raises(ValueError, match="different prompts"):
        C.compare([cell("a", 0, [1, 0]), cell("b", 0, [1, 0], hash_="other")], "a", "b", "proto")


def test_leaderboards_read_each_defense_at_its_chosen_setting_only():
    from safety_units.experiments.defense_bench.report import controls_of

    grid = [cell("antidote", 0, ones(40), setting="r0.01"), cell("antidote", 0, ones(10), setting="r0.3")]
    cells = grid + [cell("antidote", 1, ones(38), setting="r0.01"), cell("none", 0, ones(40)),
                    cell("random_prune", 0, ones(41), setting="r0.01"), cell("shrink_antidote", 0, ones(39)),
                    cell("lisa", 0, ones(9), setting="a"), cell("lisa", 0, ones(5), setting="b")]
    with pytest.raises(ValueError, match="two cells"):  # seed 0 holds the whole grid: never a silent pick
        C.summary(cells, "antidote", "proto")
    chosen = C.at_choice(cells, {"antidote": "r0.01", "none": ""}, P.CONTROLS)
    assert C.summary(chosen, "antidote", "proto")["hs"] == pytest.approx(0.78)  # r0.01 at seeds 0, 1, not r0.3
    assert {c["defense"] for c in chosen} == {"antidote", "none", "random_prune", "shrink_antidote"}  # lisa: no choice
    assert controls_of("antidote") == ["random_prune", "shrink_antidote"] and controls_of("esu_cu") == ["random"]
    assert controls_of("vaccine") == []


def test_the_tuning_table_names_a_grid_with_no_eligible_setting():
    from safety_units.experiments.defense_bench.report import pick

    sel = {"tuning": {"booster": {"setting": "a", "eligible": False}, "vaccine": {"setting": "b", "eligible": True}}}
    assert pick(sel, "booster", "a") == "none eligible: stops after tuning" and pick(sel, "booster", "b") == ""
    assert pick(sel, "vaccine", "b") == "**yes**" and pick({}, "vaccine", "b") == ""


def test_hierarchical_bootstrap_widens_with_seed_variance():
    from safety_units.utils.stats import hierarchical_bootstrap

    same = [(ones(30), ones(20))] * 3
    spread = [(ones(45), ones(20)), (ones(20), ones(20)), (ones(25), ones(20))]
    a, b = hierarchical_bootstrap(same, 2000), hierarchical_bootstrap(spread, 2000)
    assert a["diff"] == pytest.approx(0.2) and b["diff"] == pytest.approx(0.2)
    assert b["ci"][1] - b["ci"][0] > 2 * (a["ci"][1] - a["ci"][0]) and a["p"] < 0.01
    with pytest.raises(ValueError):
        hierarchical_bootstrap([([1], [1, 0])])


# --------------------------------------------------------------------------- a benchmark dir, end to end
class Judge:
    path, calls = "probe.safetensors", 0

    def harmful(self, prompts, responses):
        Judge.calls += 1
        return [r == "harmful" for r in responses]


def fake_stage(bench, st, rng):
    """A finished stage: point.json, eval.json (both splits) and generations.jsonl; the harmful rate falls with the
    defense's name length and the validation FA stays near 0.8 (everything is eligible)."""
    d = bench / st.name
    d.mkdir(parents=True, exist_ok=True)
    rate = 0.1 + 0.4 * (len(st.labels.get("defense") or "") % 5) / 5
    gens, ev = [], {"oktest": {"value": 0.1}, "ppl": {"value": 5.0}}
    for task, n in (("beavertails", 12), ("beavertails_val", 8)):
        outs = [int(rng.random() < rate) for _ in range(n)]
        gens += [{"task": task, "prompt": f"{task}{i}", "completion": "harmful" if o else "no", "refusal": not o}
                 for i, o in enumerate(outs)]
        ev[task] = {"value": sum(outs) / n, "n": n, "extra": {"outcomes": outs, "prompt_hash": task,
                                                              "overlaps_removed": 0}}
    for task, n in (("sst2", 20), ("sst2_val", 10)):
        outs = [int(rng.random() < 0.8) for _ in range(n)]
        ev[task] = {"value": sum(outs) / n, "n": n, "extra": {"outcomes": outs, "majority": 0.5}}
    d.joinpath("eval.json").write_text(json.dumps(ev))
    d.joinpath("generations.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gens))
    d.joinpath("point.json").write_text(json.dumps({"name": st.name, "labels": st.labels, "seconds": 3.0, "train": {
        "train_seconds": 2.0, "delta_norm": 1.5}}))
    bench.joinpath(f"{st.name}.stage.json").write_text(json.dumps({"seconds": 3.0}))


def test_the_benchmark_grows_by_its_choices_and_reports(tmp_path):
    from safety_units.experiments.defense_bench.report import collect, write_report

    bench, rng = tmp_path / "bench", random.Random(0)
    grown = []
    for _ in range(4):
        for st in P.plan(CPU, str(bench)):
            if st.kind == "attribute":  # timed only: no cell
                bench.mkdir(exist_ok=True)
                bench.joinpath(f"{st.name}.stage.json").write_text(json.dumps({"seconds": 1.0}))
            elif not (bench / st.name / "eval.json").is_file():
                fake_stage(bench, st, rng)
        grown.append(P.advance(bench, CPU, Judge()))
    assert grown == [True, True, False, False]  # tune -> attack -> test, then nothing new
    sel = T.read_selection(bench)
    assert set(sel["settings"]) == {d for d in P.DEFENSES if d not in P.CONTROLS}
    assert set(sel["worst_attack"]) == set(P.DEFENSES) and set(sel["worst_attack"].values()) <= set(CPU.attacks)
    out = collect(bench, CPU, tmp_path / "results" / "defenses", Judge())
    md = write_report(tmp_path / "results").read_text()
    for part in ("## Tuning", "## The attacker", "## Leaderboard at the protocol attack",
                 "## Leaderboard at each defense's worst attack", "## Which defense should I use?",
                 "## Deviations from each peer's code", "| vaccine | defense.rho=0.5 |", HS_RULE):
        assert part in md, part
    calls = Judge.calls
    collect(bench, CPU, tmp_path / "results" / "defenses", Judge())
    assert Judge.calls == calls  # every stage's verdicts were cached
    data = json.loads(out.read_text())
    assert data["planned"] == len(P.plan(CPU, str(bench))) == data["projection"]["chosen"]["stages"]
    assert data["projection"]["fewest"]["stages"] <= data["planned"] and "for the plan as chosen" in md


SHIPPED = ROOT / "results" / "defenses"


@pytest.mark.skipif(not (SHIPPED / "cells.json").is_file(), reason="results/defenses not shipped yet")
def test_the_report_is_rebuilt_from_its_shipped_cells(tmp_path):
    from safety_units.experiments.defense_bench.report import write_report

    (tmp_path / "defenses").mkdir()
    shutil.copy(SHIPPED / "cells.json", tmp_path / "defenses" / "cells.json")
    assert write_report(tmp_path).read_text() == (ROOT / "results" / "defenses.md").read_text()
    cells = json.loads((SHIPPED / "cells.json").read_text())["cells"]
    for split in ("val", "test"):  # identical prompts across every cell of a split
        assert len({c[split]["prompt_hash"] for c in cells}) == 1


@pytest.mark.parametrize("scale", ["gpu", "gpu_peers"])
def test_the_gpu_scales_compose_and_the_peers_run_as_published(scale, tmp_path):
    from safety_units.experiments.defense_bench.peers import PEERS_AS_PUBLISHED
    from safety_units.experiments.study.runner import stage_configs

    sc = P.SCALES[scale]
    picks = {d: T.default_tag(d) if sc.grid != "published" else "" for d in P.DEFENSES if d not in P.CONTROLS}
    stages = P.plan(sc, str(tmp_path), {"settings": picks, "worst_attack": {d: P.PROTOCOL for d in P.DEFENSES}})
    assert {s.labels.get("seed") for s in stages} >= {0, 1, 2}
    seen = set()
    for st in stages:
        d = st.labels.get("defense")
        if st.labels.get("seed") != 0 or st.kind == "attribute" or st.labels.get("attack") not in (None, P.PROTOCOL) \
                or (st.kind, d) in seen:
            continue  # other seeds, attacks and grid points differ only in `seed` and their own overrides
        seen.add((st.kind, d))
        t = stage_configs(st, tmp_path, sc, [])["train"]
        if sc.peers_as_published and st.name.startswith(("ft_proto", "post_proto")):
            published = PEERS_AS_PUBLISHED[d if d in PEERS_AS_PUBLISHED else "none"]
            rank = next(o for o in published["adapter"] if o.startswith("adapter.rank="))
            assert t.adapter.rank == int(rank.split("=")[1]) and st.kind == "train_eval", st.name
    if sc.peers_as_published:
        assert not any(s.kind == "posthoc" or "shrink" in s.name for s in stages)
