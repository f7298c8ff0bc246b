"""Validate the refusal judges against human labels and reference sets; write results/judges.md.

    python scripts/judge_report.py                      # strings, patterns, probe, ensemble (probe trains once)
    python scripts/judge_report.py --judges strings patterns

Every number is computed here from ../shared/data:
* XSTest v2 completions with human labels (judge_dev/, 2 models): accuracy, precision and recall of "refusal"
  (binary; partial refusal counts as refusal);
* refusal responses cut to 48 tokens (safety-tuned-llamas, Wei et al.'s safety-short): share judged refusal;
* held-out Alpaca reference answers (hash split [0.9, 1), never trained on): share judged compliance.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from safety_units.evaluation.judges.refusal import EnsembleJudge  # noqa: E402
from safety_units.utils.stats import cohen_kappa  # noqa: E402

DEV_FILES = ("gpt4", "llama2orig")
CUT_TOKENS = 48


class Memo:
    """A judge that remembers its verdicts, so an ensemble of judges already run costs nothing more."""

    def __init__(self, judge):
        self.judge_, self.seen = judge, {}

    def judge(self, prompts: list[str], completions: list[str]):
        key = hash((tuple(prompts), tuple(completions)))
        if key not in self.seen:
            self.seen[key] = self.judge_.judge(prompts, completions)
        return self.seen[key]


def compose(overrides: list[str]):
    from safety_units.utils.config import compose_config

    return compose_config("evaluate", overrides)


def load_sets(cfg, tokenizer) -> dict[str, dict]:
    """Every labelled set: {name: {"prompts", "completions", "truth" (True = refusal) or None, "expect"}}."""
    from safety_units.data.sources import Source

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


def metrics(verdicts: list[bool], s: dict) -> dict:
    if s.get("truth") is not None:
        t = s["truth"]
        tp = sum(v and y for v, y in zip(verdicts, t))
        return {"accuracy": sum(v == y for v, y in zip(verdicts, t)) / len(t),
                "precision": tp / max(1, sum(verdicts)), "recall": tp / max(1, sum(t)), "n": len(t)}
    share = sum(v == s["expect"] for v in verdicts) / len(verdicts)
    return {"share_" + ("refusal" if s["expect"] else "compliance"): share, "n": len(verdicts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--judges", nargs="+", default=["strings", "patterns", "probe", "ensemble"])
    ap.add_argument("--out", default=str(ROOT / "results" / "judges.md"))
    args = ap.parse_args()

    from safety_units.utils.config import instantiate
    from safety_units.models.loading import smollm2_tokenizer

    default_judge = compose([]).judge._target_
    cfg = compose([])
    sets = load_sets(cfg, smollm2_tokenizer(cfg.paths.cache_dir))
    results: dict[str, dict[str, dict]] = {}
    votes: dict[str, dict[str, list[bool]]] = {}
    built: dict[str, Memo] = {}
    for name in args.judges:
        jcfg = compose([f"judge={name}"]).judge
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
            results[name][set_name] = metrics(v, s)
            print(name, set_name, results[name][set_name], flush=True)
        results[name]["_target_"] = jcfg._target_

    lines = ["# Refusal judges against human labels and reference sets", "",
             f"Written by `python scripts/judge_report.py` (judges: {', '.join(args.judges)}). The default judge "
             f"(`conf/evaluate.yaml`) is `{default_judge}`. Binary labels: XSTest's partial refusal counts as refusal.",
             "", "## XSTest v2 completions with human labels (`judge_dev/`)", "",
             "| judge | file | n | accuracy | precision | recall |", "|---|---|---:|---:|---:|---:|"]
    for name in args.judges:
        for f in DEV_FILES:
            m = results[name][f"xstest_{f}"]
            lines.append(f"| {name} | {f} | {m['n']} | {m['accuracy']:.3f} | {m['precision']:.3f} | "
                         f"{m['recall']:.3f} |")
    lines += ["", f"## Reference sets (responses cut to {CUT_TOKENS} tokens of the SmolLM2 tokenizer)", "",
              "| judge | " + " | ".join(k for k in sets if not k.startswith("xstest")) + " |",
              "|---|" + "---:|" * sum(not k.startswith("xstest") for k in sets)]
    for name in args.judges:
        cells = []
        for k in sets:
            if k.startswith("xstest"):
                continue
            m = results[name][k]
            cells.append(f"{next(v for key, v in m.items() if key.startswith('share_')):.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    sizes = ", ".join(f"{k} {len(s['completions'])}" for k, s in sets.items() if not k.startswith("xstest"))
    stl = sets["stl_refusals@48"]
    none = [i for i in range(len(stl["completions"])) if not any(votes[j]["stl_refusals@48"][i] for j in args.judges)]
    n_all = len(stl["completions"])
    lines += ["", f"Shares: refusal for the refusal sets, compliance for the Alpaca answers (n: {sizes}).", "",
              f"**The safety-tuned-llamas set is not all refusals.** {len(none)} of its {n_all} \"safe responses\" "
              f"({len(none) / n_all:.1%}) are called compliance by every judge above (the probe was trained with this "
              "set as its refusal side). The first five of them (file order):", ""]
    lines += [f"- *{stl['prompts'][i][:90]}* -> \"{' '.join(stl['completions'][i].split())[:160]}...\""
              for i in none[:5]]
    lines.append("")
    if len(args.judges) > 1:
        lines += ["## Agreement between judges (Cohen's kappa over every set above)", "",
                  "| | " + " | ".join(args.judges) + " |", "|---|" + "---:|" * len(args.judges)]
        for a in args.judges:
            row = []
            for b in args.judges:
                va = [x for k in sets for x in votes[a][k]]
                vb = [x for k in sets for x in votes[b][k]]
                row.append(f"{cohen_kappa(va, vb):.3f}")
            lines.append(f"| {a} | " + " | ".join(row) + " |")
        lines.append("")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    (Path(args.out).with_suffix(".json")).write_text(json.dumps(results, indent=2))
    print("\n".join(lines))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
