"""SCANS against refusal-direction ablation and no steering (scripts/run_scans.py): the runs and results/scans.md."""
