"""The SSAH study v2 (scripts/run_study.py): does a few-unit account of safety alignment hold on SmolLM2?

The stages: attribute the shipped model (the RU budget of claim a); align it (--scale gpu: 2,000 refusal pairs +
2,000 benign instructions; cpu: 480 examples) -> the aligned model; attribute that (ESU / EUU / CU / RU); (b) ablate
each class and size-matched random sets; (a) full vs RU-only vs random-budget alignment x learning rates x seeds;
(c) fine-tune the aligned model under each threat model (Alpaca, Dolly, harmful mixtures p, AOA epochs) with
freeze = none / esu / esu_cu / random 7.5% / layers, x seeds. Every trained model is evaluated in memory (ASR,
OKTest over-refusal, held-out perplexity of the fine-tune's task); the report is written from the artifacts only,
with the criteria of `verdicts`.

Modules:
    plan      the stages of a scale (setup, (a) alignment budget, (b) ablation, (c) threat models x freezes x seeds)
    runner    runs the stages in memory, resumably, optionally in worker processes
    verdicts  the criteria fixed before any number, and the paired comparisons behind them
    tables    the report's per-section tables
    report    the markdown report and summary.json, built from the stage artifacts only
    plots     the frontier and threat-model plots
"""
