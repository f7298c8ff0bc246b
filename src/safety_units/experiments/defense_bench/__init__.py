"""The defense benchmark (scripts/run_defenses.py): SSAH's unit freezing against the peer defenses on the shared
harmful fine-tuning protocol. plan.py (stages at the cpu and gpu scales), criteria.py (the ranking rule and the
thresholds, fixed before any run), report.py (results/defenses.md, from the artifacts only)."""
