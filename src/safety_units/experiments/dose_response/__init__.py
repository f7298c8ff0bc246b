"""Dose-response of unit ablation: zero the top-k share of units and read safety and utility against k.

At each share k (per unit kind: round(k * units) MLP units and as many attention units) three arms are zeroed:
the units with the highest safety-minus-utility percentile rank (`ablate.top=safety_minus_utility`), those with the
highest utility rank (`ablate.top=utility`, the second control) and seeded random sets of the same size
(`ablate.top=random`, one run per seed). Each point is one `python evaluate.py` run in <runs>/<point>/, plus one
unablated baseline; a point whose eval.json and eval_meta.json exist is not run again.

The report reads every number from those runs' eval.json / eval_meta.json: per task the value at each k for each
arm, the random band (mean, sd, min-max over seeds), and paired tests (compare.paired_difference: paired bootstrap
95% CI and exact McNemar p) of the top safety-minus-utility set against the baseline and against each random set.
Modules: `plan` (the points, their commands and resumable runs) and `report` (summary, tables and plot from the
runs' artifacts). scripts/dose_response.py is the command line.
"""
