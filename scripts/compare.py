"""Paired comparison of evaluations on the same prompts (refuses differing prompt hashes).

    python scripts/compare.py <run dir or eval.json A> <B> [<C> ...] [--out table.md]

Compares every later run with the first (the baseline): per task the change, its paired bootstrap 95% interval and
an exact McNemar p (safety_units.evaluation.compare).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safety_units.evaluation.compare import PromptMismatchError, compare_table, load_eval
from safety_units.utils.errors import ConfigError, friendly_errors


@friendly_errors
def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run dirs or eval.json files; the first is the baseline")
    ap.add_argument("--out", help="also write the tables to this markdown file")
    args = ap.parse_args(argv)
    if len(args.runs) < 2:
        raise ConfigError("give at least two runs to compare (the first is the baseline).")
    base = load_eval(args.runs[0])
    tables = []
    for other in args.runs[1:]:
        try:
            table = compare_table(base, load_eval(other), labels=("A", "B"))
        except PromptMismatchError as e:
            raise PromptMismatchError(f"{args.runs[0]} vs {other}: {e}") from None
        tables.append(f"A = {args.runs[0]}, B = {other}\n\n{table}\n")
    text = "\n".join(tables)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
