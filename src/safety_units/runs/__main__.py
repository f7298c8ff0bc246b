"""python -m safety_units.runs <multirun dir> [--out runs.md] [--csv runs.csv] [--metrics REGEX]: the runs table of a
sweep, offline (safety_units.runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from safety_units.utils.errors import friendly_errors
from safety_units.runs import __doc__ as DOC
from safety_units.runs import markdown, runs_table, write_csv


@friendly_errors
def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m safety_units.runs", description=DOC,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="a multirun dir (logs/<task>/multiruns/<time>) or a folder of run dirs")
    ap.add_argument("--out", help="also write the table as markdown to this file")
    ap.add_argument("--csv", help="also write the table as CSV to this file")
    ap.add_argument("--metrics", help="only the metrics whose name matches this regular expression")
    args = ap.parse_args(argv)
    table = runs_table(args.root, args.metrics)
    text = markdown(table)
    print(f"{len(table['jobs'])} runs; swept: {', '.join(table['varied']) or 'nothing'}\n\n{text}", flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.csv:
        write_csv(table, args.csv)
    return text


if __name__ == "__main__":
    main()
