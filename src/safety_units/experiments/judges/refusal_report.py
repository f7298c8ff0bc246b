"""The refusal judges against human labels and reference sets: results/judges.{md,json}
(scripts/judge_report.py is the command line).

Every number is computed from ../shared/data:
* XSTest v2 completions with human labels (judge_dev/, 2 models): accuracy, precision and recall of "refusal"
  (binary; partial refusal counts as refusal);
* refusal responses cut to 48 tokens (safety-tuned-llamas, Wei et al.'s safety-short): share judged refusal;
* held-out Alpaca reference answers (hash split [0.9, 1), never trained on): share judged compliance.
An ensemble reuses the verdicts of its members already run (`Memo`: the probe is the slow one). The report also
lists the safety-tuned-llamas "refusals" that no judge calls a refusal, and Cohen's kappa between the judges.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from safety_units.data.sources import Source
from safety_units.evaluation.judges.refusal import EnsembleJudge
from safety_units.utils.config import compose_config, instantiate
from safety_units.utils.stats import cohen_kappa, confusion_counts

DEV_FILES = ("gpt4", "llama2orig")
CUT_TOKENS = 48
JUDGES = ["strings", "patterns", "probe", "ensemble"]


class Memo:
    """A judge that remembers its verdicts, so an ensemble of judges already run costs nothing more."""

    def __init__(self, judge):
        self.judge_, self.seen = judge, {}

    def judge(self, prompts: list[str], completions: list[str]):
        key = hash((tuple(prompts), tuple(completions)))
        if key not in self.seen:
            self.seen[key] = self.judge_.judge(prompts, completions)
        return self.seen[key]


def load_sets(cfg, tokenizer) -> dict[str, dict]:
    """Every labelled set: {name: {"prompts", "completions", "truth" (True = refusal) or None, "expect"}}."""
    data = Path(cfg.paths.data_dir)
    sets = {}
    for name in DEV_FILES:
        with open(data / "judge_dev" / f"xstest_v2_completions_{name}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        sets[f"xstest_{name}"] = {"prompts": [r["prompt"] for r in rows], "completions": [r["completion"] for r in rows],
                                  "truth": [r["final_label"] != "1_full_compliance" for r in rows]}

    def cut(text: str) -> str:
        return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:CUT_TOKENS])

    stl = json.loads((data / "safety_tuned_llamas" / "safety_only_data_Instructions.json").read_text())
    sets["stl_refusals@48"] = {"prompts": [r["instruction"] for r in stl], "completions": [cut(r["output"]) for r in stl],
                               "expect": True}
    with open(data / "safety_short" / "SFT_aligned_llama2-7b-chat-hf_train_short.csv", newline="") as f:
        wei = list(csv.DictReader(f))
    sets["wei_refusals@48"] = {"prompts": [r["prompt"] for r in wei], "completions": [cut(r["response"]) for r in wei],
                               "expect": True}
    src = Source.from_config(cfg.eval.tasks.ppl.source, "ppl")
    src.limit = None
    held = src.load(0)
    sets["alpaca_heldout_answers"] = {"prompts": [ex.prompt for ex in held], "completions": [ex.response for ex in held],
                                      "expect": False}
    return sets


def set_metrics(verdicts: list[bool], s: dict) -> dict:
    """Accuracy, precision and recall of "refusal" on a labelled set; else the share judged as the set expects."""
    if s.get("truth") is not None:
        c = confusion_counts(verdicts, s["truth"])
        n = len(s["truth"])
        return {"accuracy": (c["tp"] + c["tn"]) / n, "precision": c["tp"] / max(1, c["tp"] + c["fp"]),
                "recall": c["tp"] / max(1, c["tp"] + c["fn"]), "n": n}
    share = sum(v == s["expect"] for v in verdicts) / len(verdicts)
    return {"share_" + ("refusal" if s["expect"] else "compliance"): share, "n": len(verdicts)}


def run_judges(judges: list[str], sets: dict[str, dict]) -> tuple[dict, dict]:
    """(results: judge -> set -> metrics, with the judge's _target_; votes: judge -> set -> refusal verdicts)."""
    results: dict[str, dict[str, dict]] = {}
    votes: dict[str, dict[str, list[bool]]] = {}
    built: dict[str, Memo] = {}
    for name in judges:
        jcfg = compose_config("evaluate", [f"judge={name}"]).judge
        if jcfg._target_.endswith("EnsembleJudge"):  # reuse the members already built (the probe is the slow one)
            members = {k: built.get(k) or Memo(instantiate(v, f"judge.judges.{k}"))
                       for k, v in jcfg.judges.items() if v is not None}
            judge = EnsembleJudge(members, decision=jcfg.decision, min_words=jcfg.min_words)
        else:
            judge = built[name] = Memo(instantiate(jcfg, "judge"))
        results[name], votes[name] = {}, {}
        for set_name, s in sets.items():
            v = [x.refusal for x in judge.judge(s["prompts"], s["completions"])]
            votes[name][set_name] = v
            results[name][set_name] = set_metrics(v, s)
            print(name, set_name, results[name][set_name], flush=True)
        results[name]["_target_"] = jcfg._target_
    return results, votes


def render(judges: list[str], sets: dict[str, dict], results: dict, votes: dict, default_judge: str) -> str:
    """The markdown report from the sets, each judge's metrics and its verdicts."""
    lines = ["# Refusal judges against human labels and reference sets", "",
             f"Written by `python scripts/judge_report.py` (judges: {', '.join(judges)}). The default judge "
             f"(`conf/evaluate.yaml`) is `{default_judge}`. Binary labels: XSTest's partial refusal counts as refusal.",
             "", "## XSTest v2 completions with human labels (`judge_dev/`)", "",
             "| judge | file | n | accuracy | precision | recall |", "|---|---|---:|---:|---:|---:|"]
    for name in judges:
        for f in DEV_FILES:
            m = results[name][f"xstest_{f}"]
            lines.append(f"| {name} | {f} | {m['n']} | {m['accuracy']:.3f} | {m['precision']:.3f} | "
                         f"{m['recall']:.3f} |")
    refs = [k for k in sets if not k.startswith("xstest")]
    lines += ["", f"## Reference sets (responses cut to {CUT_TOKENS} tokens of the SmolLM2 tokenizer)", "",
              "| judge | " + " | ".join(refs) + " |", "|---|" + "---:|" * len(refs)]
    for name in judges:
        cells = [f"{next(v for key, v in results[name][k].items() if key.startswith('share_')):.3f}" for k in refs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    sizes = ", ".join(f"{k} {len(sets[k]['completions'])}" for k in refs)
    stl = sets["stl_refusals@48"]
    none = [i for i in range(len(stl["completions"])) if not any(votes[j]["stl_refusals@48"][i] for j in judges)]
    n_all = len(stl["completions"])
    lines += ["", f"Shares: refusal for the refusal sets, compliance for the Alpaca answers (n: {sizes}).", "",
              f"**The safety-tuned-llamas set is not all refusals.** {len(none)} of its {n_all} \"safe responses\" "
              f"({len(none) / n_all:.1%}) are called compliance by every judge above (the probe was trained with this "
              "set as its refusal side). The first five of them (file order):", ""]
    lines += [f"- *{stl['prompts'][i][:90]}* -> \"{' '.join(stl['completions'][i].split())[:160]}...\""
              for i in none[:5]]
    lines.append("")
    if len(judges) > 1:
        lines += ["## Agreement between judges (Cohen's kappa over every set above)", "",
                  "| | " + " | ".join(judges) + " |", "|---|" + "---:|" * len(judges)]
        every = {j: [x for k in sets for x in votes[j][k]] for j in judges}
        for a in judges:
            lines.append(f"| {a} | " + " | ".join(f"{cohen_kappa(every[a], every[b]):.3f}" for b in judges) + " |")
        lines.append("")
    return "\n".join(lines)


def write_report(judges: list[str], out: Path) -> str:
    """Run the judges on every set; write `out` (markdown) and its .json (the metrics); return the markdown."""
    from safety_units.models.loading import smollm2_tokenizer  # why: loads transformers; the rest of the module need not

    cfg = compose_config("evaluate", [])
    sets = load_sets(cfg, smollm2_tokenizer(cfg.paths.cache_dir))
    results, votes = run_judges(judges, sets)
    text = render(judges, sets, results, votes, cfg.judge._target_)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    return text
