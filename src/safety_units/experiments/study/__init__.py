"""The SSAH study v2 (scripts/run_study.py): does a few-unit account of safety alignment hold on SmolLM2?

Modules:
    plan      the stages of a scale (setup, (a) alignment budget, (b) ablation, (c) threat models x freezes x seeds)
    runner    runs the stages in memory, resumably, optionally in worker processes
    verdicts  the criteria fixed before any number, and the paired comparisons behind them
    tables    the report's per-section tables
    report    the markdown report and summary.json, built from the stage artifacts only
    plots     the frontier and threat-model plots
"""
