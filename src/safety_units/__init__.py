"""safety_units: find the safety-critical units of an aligned LLM and train around them.

Modules, one per concept (one name per line; tests/test_structure.py checks that the list is complete):
    errors              the project's exceptions and the one-paragraph error handler of the entry points
    ranks               rank-zero logging and printing under multi-process training
    config              Hydra helpers: instantiate with clear errors, callbacks and loggers from config groups
    models              load the real SmolLM2, any local HF causal LM, or a tiny random Llama; forward helpers
    sources             read CSV/JSON/JSONL/TXT rows with a field mapping into examples, hash splits
    chat                the chat template and label masking: render, encode, pad
    data                the training datamodule: mixing, self-distillation, a resumable sharded sampler
    generation          batched greedy decoding with left padding; self-distilled responses
    units               which parameter slices make up an MLP / attention unit, per architecture
    calibration         the templated batches that scorers and the drift monitor run the model on
    scoring             per-unit importance scores (wifv, activation, snip), O(units) memory
    contrast            scoring=contrast: activation difference against the base model
    delta               scoring=delta: each unit's weight change against the base model
    atp                 scoring=atp: attribution patching of each unit toward its harmless mean
    mask                scoring=mask: a learned sparse unit mask that breaks refusal and keeps utility
    refusal_direction   scoring=refusal_direction: units writing along the refusal direction
    classification      ESU / EUU / CU / RU from safety and utility scores
    unit_map            the portable unit map file and its selections
    selection           which units a freeze= strategy or an ablate= config picks
    masking             exact gradient masks from a selection; ablation zeroes one
    freezing            freeze= strategies as maskers
    lora                LoRA adapters held at zero on frozen unit slices; merged and PEFT exports
    module              the LightningModule
    callbacks           Ctrl-C checkpoint, frozen-entry check and export, the before/after evaluation
    drift               unit drift during training: re-scored classes vs step 0 (callbacks=drift)
    training            what `python train.py` runs
    attribution         what `python attribute.py` runs, and the cached attribution of freeze.auto_attribute
    judge               refusal judges: strings, patterns, ensemble, a local model
    judge_probe         the learned refusal probe, trained here and cached
    judge_harm          the learned harmfulness probe (is a response harmful?) behind the defense benchmark's HS
    task_results        task results, prompt selection by stable hash, a refusal task's result from verdicts
    multiple_choice     zero-shot multiple-choice utility by log-likelihood
    rejudge             reading saved completions
    evaluation          refusal ASR, over-refusal, perplexity, re-judging; the suite
    evaluate_run        what `python evaluate.py` runs (with unit ablation)
    stats               Wilson intervals, McNemar, paired bootstrap, Cohen's kappa, prompt-list hashes
    compare             paired comparison of runs on the same prompts, the before/after table
    run_logging         what a run tells its loggers: params, summary, completions tables, plots
    runs                a sweep's runs table from the jobs' files, offline (subpackage):
    runs.__main__           python -m safety_units.runs <multirun dir>
    stability           IoU / rank correlation of unit maps, planted-set recovery
    plots               the plots of unit maps and drift (matplotlib, imported where a plot is drawn)
    dose_response       the dose-response ablation sweep (subpackage):
    dose_response.plan      the points, their evaluate.py commands, resumable runs
    dose_response.report    summary, tables and plot from the runs' artifacts
    attribution_validity    do the scorers find causal safety units: criteria and tables over sweeps
    validity_artifacts      the small JSON inputs of that report's planted, stability, sparsity, cost tables
    defenses            defense= training objectives: Vaccine, Booster, Lisa; SafeInstr's data share
    posthoc             defense= after fine-tuning: SafeLoRA's projection, Antidote's pruning of the update
    defense_bench       the defense benchmark (subpackage, scripts/run_defenses.py):
    defense_bench.plan      defenses x threat models x seeds at the cpu and gpu scales, on the study runner
    defense_bench.criteria  the ranking rule, significance and cost thresholds, the goal (fixed before the runs)
    defense_bench.report    cells.json from the runs (HS re-judged), and results/defenses.md from it
    study               the SSAH study v2 (subpackage, scripts/run_study.py):
    study.plan              the stages of a scale
    study.runner            runs them in memory, resumably, in worker processes
    study.verdicts          the criteria, fixed before the numbers, and their paired comparisons
    study.tables            the report's tables
    study.report            the markdown report and summary.json from the stage artifacts
    study.plots             the frontier and threat-model plots
    study.cli               the command line shared by scripts/run_study.py and scripts/run_defenses.py
    prompt_states       block outputs at prompt positions and the prompts they are read on (steering, testbed)
    steering            steer=: SCANS (vectors, anchored blocks, sigma(q), signed hooks), the context manager
    refusal_ablation    steer=refusal_ablation: Arditi et al.'s direction selection and ablation hooks
    steer_report        results/scans.md: the goal's criteria, sigma(q)'s metrics, the report
    objectives          objective=: DPO and NPO unlearning losses (SFT is the plain loss)
    pairs               data=preference / unlearning: rows with roles and reference log-probabilities
    synthetic           Jain et al.'s task x concept testbed (subpackage, scripts/run_jain_testbed.py):
    synthetic.world         the generator (operators, concepts, jailbreak variants) and its tokenizer
    synthetic.model         model=synthetic: a small Llama pretrained on the world, cached and resumable
    synthetic.data          data=synthetic: safety fine-tuning rows for sft, dpo and unlearning
    synthetic.analysis      separation per layer, null-space shares of an update, jailbreak placement
    synthetic.testbed       the testbed run, the findings' criteria and results/jain_testbed.md
    synthetic.ground_truth  the scorers' ground truth: a planted unit set S and each scorer's precision against it
"""

__version__ = "0.1.0"


def _register_resolvers() -> None:
    """OmegaConf resolvers the configs use (registered on import, before any entry point resolves a config)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("complement"):  # ${complement:p} = 1 - p, e.g. the benign share of a mixture
        OmegaConf.register_new_resolver("complement", lambda p: 1.0 - float(p))


_register_resolvers()
