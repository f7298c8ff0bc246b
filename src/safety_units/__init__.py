"""safety_units: find the safety-critical units of an aligned LLM and train around them.

Layers, lowest first. A folder imports only from folders above it in this list (and from itself); the top two
also from each other's level, never downward-up. tests/test_structure.py enforces it, with no import cycle and no
private name imported across modules:

    utils -> units -> models -> data -> attribution -> steering -> evaluation -> defenses -> training
          -> experiments, runs

Modules (one name per line; tests/test_structure.py checks that the map is complete):
    utils                       helpers every layer uses (no torch model code):
    utils.errors                    the project's exceptions and the one-paragraph error handler of the entry points
    utils.ranks                     rank-zero logging and printing under multi-process training
    utils.config                    Hydra helpers: instantiate with clear errors, callbacks and loggers from config
    utils.stats                     Wilson intervals, McNemar, paired bootstrap, Cohen's kappa, prompt-list hashes
    utils.plots                     the plots of unit maps and drift (matplotlib, imported where a plot is drawn)
    utils.fingerprints              which weights a unit map, a cached judge or a run was computed on
    utils.run_logging               what a run tells its loggers: params, summary, images, timing
    units                       what a unit is and what is done to a set of them:
    units.experts                   MoE experts' fused 3-D tensors: their layout, a forward that taps each expert
    units.slices                    the parameter slices a unit owns (ParamSlice) and a group of units (UnitGroup)
    units.layouts                   which modules hold the units: units.names, the per-architecture table, detection
    units.heads                     attention heads as units, over separate or fused q/k/v
    units.groups                    the unit groups of a model (MLP, expert, attention, head) and taps on them
    units.classification            ESU / EUU / CU / RU from safety and utility scores
    units.unit_map                  the portable unit map file and its selections
    units.masking                   exact gradient masks from a selection; ablation zeroes one
    units.stability                 IoU / rank correlation of unit maps, planted-set recovery
    models                      the model and what trains it:
    models.loading                  load the real SmolLM2, any local HF causal LM, or a tiny random Llama
    models.forward                  eval mode, hooks, the decoder without its head, hidden states, response NLL
    models.sharded                  whether a strategy shards the weights (FSDP, ZeRO-3)
    models.lora                     LoRA adapters held at zero on frozen unit slices; merged and PEFT exports
    models.objectives               objective=: the Objective base (SFT), DPO, NPO unlearning, build_objective
    models.module                   the LightningModule
    data                        rows, prompts and batches:
    data.sources                    read CSV/JSON/JSONL/TXT rows with a field mapping into examples, hash splits
    data.chat                       the chat template and label masking: render, encode, pad
    data.generation                 batched greedy decoding with left padding; self-distilled responses
    data.datamodule                 the training datamodule: mixing, self-distillation, a resumable sharded sampler
    data.pairs                      data=preference / unlearning: rows with roles and reference log-probabilities
    data.calibration                the templated batches that scorers and the drift monitor run the model on
    attribution                 which units matter (python attribute.py):
    attribution.scorer              the Scorer interface (a base-model ReferenceScorer), ScoringRun, build from _target_
    attribution.scoring             the shared machinery: token positions, activation statistics
    attribution.one_set             score_units: wifv, activation or snip of one model on one set (drift, benchmarks)
    attribution.wifv                scoring=wifv | activation: forward-only scores from activation statistics
    attribution.snip                scoring=snip: first-order SNIP per unit
    attribution.contrast            scoring=contrast: activation difference against the base model
    attribution.delta               scoring=delta: each unit's weight change against the base model
    attribution.atp                 scoring=atp: attribution patching of each unit toward its harmless mean
    attribution.mask                scoring=mask: a learned sparse unit mask that breaks refusal and keeps utility
    attribution.refusal_direction   scoring=refusal_direction: units writing along the refusal direction
    attribution.pipeline            what `python attribute.py` runs, and the cached attribution of auto_attribute
    attribution.selection           which units a freeze= strategy or an ablate= config picks from a unit map
    steering                    activation steering at inference (steer=):
    steering.steerer                the Steerer interface (none, anchored fits cached), build from _target_, the hooks
    steering.prompt_states          block outputs at prompt positions and the prompts they are read on
    steering.scans                  steer=scans: SCANS (vectors, anchored blocks, sigma(q), signed hooks)
    steering.refusal_ablation       steer=refusal_ablation: Arditi et al.'s direction selection and ablation hooks
    evaluation                  what a model does (python evaluate.py):
    evaluation.judges               judges of completions (judge=, harm_judge=):
    evaluation.judges.refusal           refusal judges: strings, patterns, ensemble, a local model
    evaluation.judges.probe             the learned refusal probe, trained here and cached
    evaluation.judges.harm              the learned harm judges behind HS: data, degenerate answers, the judge
    evaluation.judges.harm_features     a backbone's pooled response states at several layers
    evaluation.judges.heads             the judges' classifiers: logistic regression, a small MLP
    evaluation.task_results         task results, prompt selection by stable hash, a refusal task's result
    evaluation.multiple_choice      zero-shot multiple-choice utility by log-likelihood
    evaluation.rejudge              reading saved completions
    evaluation.suite                refusal ASR, over-refusal, perplexity, re-judging; the suite
    evaluation.compare              paired comparison of runs on the same prompts, the before/after table
    evaluation.run_tables           before/after summaries and completions tables for the loggers
    evaluation.run                  what `python evaluate.py` runs (with unit ablation and steering)
    defenses                    defense=: defenses against harmful fine-tuning:
    defenses.base                   the Defense interface (defense=none is the no-op), build_defense from _target_
    defenses.units                  defense=esu|esu_cu|layers|random|sn_tune: a freeze= strategy the run must use
    defenses.vaccine                defense=vaccine: train under the worst-case perturbation of attention outputs
    defenses.booster                defense=booster: the alignment loss plus the harmful-loss-reduction term
    defenses.lisa                   defense=lisa: two alternating states with a proximal term
    defenses.safeinstr              defense=safeinstr: a share of safety data mixed into the fine-tune
    defenses.posthoc                what post-hoc defenses share: target weights, the update, the export callback
    defenses.safelora               defense=safelora: project the update onto the alignment subspace
    defenses.antidote               defense=antidote: Wanda pruning of the update, per row
    defenses.random_prune           defense=random_prune: Antidote's control, as many entries per row at random
    defenses.shrink                 defense=shrink: the matched-drift control, the update scaled to a target norm
    training                    fine-tuning around the units (python train.py):
    training.freezing               freeze= strategies as maskers
    training.callbacks              Ctrl-C checkpoint, frozen-entry check and export, the before/after evaluation
    training.drift                  unit drift during training: re-scored classes vs step 0 (callbacks=drift)
    training.fit                    what `python train.py` runs
    experiments                 the studies and reports built on the layers above:
    experiments.study               the SSAH study v2 (scripts/run_study.py):
    experiments.study.plan              the stages of a scale
    experiments.study.runner            runs them in memory, resumably, in worker processes
    experiments.study.jobs              or as submitit jobs, one per stage, its inputs as dependencies (SLURM)
    experiments.study.posthoc           a posthoc stage: a post-hoc defense on an already fine-tuned model
    experiments.study.process           a stage's own log file and the heap handed back between stages
    experiments.study.verdicts          the criteria, fixed before the numbers, and their paired comparisons
    experiments.study.tables            the report's tables
    experiments.study.report            the markdown report and summary.json from the stage artifacts
    experiments.study.plots             the frontier and threat-model plots
    experiments.study.cli               the command line shared by run_study.py and run_defenses.py
    experiments.defense_bench       the defense benchmark v2 (scripts/run_defenses.py):
    experiments.defense_bench.plan      tune, attack and test phases at the cpu and gpu scales, on the runner
    experiments.defense_bench.tuning    the defenses' grids, the cells of a run, the choices (selection.json)
    experiments.defense_bench.criteria  the rules: setting, worst attack, seed-level comparisons, goal, answer
    experiments.defense_bench.cells     HS flags of a stage's completions by the HS judge, cached
    experiments.defense_bench.peers     the peers' published settings and our deviations from their code
    experiments.defense_bench.report    cells.json from the runs, and results/defenses.md from it
    experiments.dose_response       the dose-response ablation sweep (scripts/dose_response.py):
    experiments.dose_response.plan      the points, their evaluate.py commands, resumable runs
    experiments.dose_response.report    summary, tables and plot from the runs' artifacts
    experiments.dose_response.sweep     one sweep end to end: check the inputs, run the points, report
    experiments.validity            do the scorers find causal safety units (results/attribution_validity.md):
    experiments.validity.plan           the harness's lanes and steps, resumable (scripts/run_attribution_validity.py)
    experiments.validity.criteria       criteria and tables over sweeps
    experiments.validity.artifacts      the small JSON inputs of the planted, stability, sparsity, cost tables
    experiments.validity.report         results/attribution_validity.md from results/ alone
    experiments.validity.mask_preliminary   scoring=mask's first look (results/mask_preliminary.md)
    experiments.scans               SCANS against refusal-direction ablation and no steering (scripts/run_scans.py):
    experiments.scans.run               the conditions per model, resumable; cells.json, then the report
    experiments.scans.report            results/scans.md: the goal's criteria, sigma(q)'s metrics, the report
    experiments.judges              the judges' validation reports:
    experiments.judges.refusal_report   refusal judges against human labels and reference sets (results/judges.md)
    experiments.judges.harm_crossfit    the harm-judge candidates cross-fitted by prompt over every labelled pair
    experiments.judges.harm_report      harm judges out of fold, on XSTest, the HS judge (results/harm_judge.md)
    experiments.quickstart_report   the quickstart's RU-only run against its random control (results/quickstart.md)
    experiments.synthetic           Jain et al.'s task x concept testbed (scripts/run_jain_testbed.py):
    experiments.synthetic.world         the generator (operators, concepts, jailbreak variants) and its tokenizer
    experiments.synthetic.model         model=synthetic: a small Llama pretrained on the world, cached, resumable
    experiments.synthetic.data          data=synthetic: safety fine-tuning rows for sft, dpo and unlearning
    experiments.synthetic.analysis      separation per layer, null-space shares of an update, jailbreak placement
    experiments.synthetic.testbed       the testbed run, the findings' criteria and results/jain_testbed.md
    experiments.synthetic.ground_truth  the scorers' ground truth: a planted unit set S, each scorer's precision
    experiments.benchmarks          what operations cost, measured in one run (benchmarks/*.py):
    experiments.benchmarks.peak_memory      time and peak memory of a call, a function in a fresh process
    experiments.benchmarks.attribution_cost attribution per method against a per-weight naive SNIP
    experiments.benchmarks.scorer_cost      each scorer's cost relative to wifv
    experiments.benchmarks.expert_cost      attributing MoE experts against a dense model of the same active size
    experiments.benchmarks.mask_overhead    masked against unmasked training step time, full and LoRA
    experiments.benchmarks.logging_overhead what a run's wandb logging costs
    experiments.benchmarks.steering_cost    tokens per second with each steering method
    experiments.benchmarks.time_projection  projected H100 wall time of the study and the defense benchmark
    runs                        a sweep's runs table from the jobs' files, offline:
    runs.__main__                   python -m safety_units.runs <multirun dir>
"""

__version__ = "0.1.0"


def _register_resolvers() -> None:
    """OmegaConf resolvers the configs use (registered on import, before any entry point resolves a config)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("complement"):  # ${complement:p} = 1 - p, e.g. the benign share of a mixture
        OmegaConf.register_new_resolver("complement", lambda p: 1.0 - float(p))


_register_resolvers()
