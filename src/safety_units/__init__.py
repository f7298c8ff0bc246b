"""safety_units: find the safety-critical units of an aligned LLM and train around them.

Modules, one per concept:
    models          load the real SmolLM2, any local HF causal LM, or a tiny random Llama
    sources         read CSV/JSON/JSONL/TXT rows with a field mapping into examples, hash splits
    data            apply the chat template, mask prompt labels, the Lightning datamodule
    generation      batched greedy decoding with left padding
    units           which parameter slices make up an MLP / attention unit, per architecture
    scoring         per-unit importance scores (wifv, activation, snip), O(units) memory
    contrast        scoring=contrast: activation difference against the base model
    refusal_direction  scoring=refusal_direction: units writing along the refusal direction
    classification  ESU / EUU / CU / RU from safety and utility scores
    unit_map        the portable unit map file and its selections
    masking         freezing strategies as gradient masks, exact under AdamW decay
    lora            LoRA adapters held at zero on frozen unit slices; merged and PEFT exports
    module          the LightningModule
    judge           refusal judges: strings, patterns, ensemble, a local model
    judge_probe     the learned refusal probe, trained here and cached
    evaluation      refusal ASR, over-refusal, perplexity, re-judging saved completions; the suite
    multiple_choice zero-shot multiple-choice utility by log-likelihood
    rejudge         reading saved completions
    compare         paired comparison of runs on the same prompts, the before/after callback
    drift           unit drift during training: re-scored classes vs step 0 (callbacks=drift)
    stability       IoU / rank correlation of unit maps, planted-set recovery
    dose_response   the dose-response ablation sweep and its report
    attribution_validity  do the scorers find causal safety units: criteria and tables over sweeps
    stats           McNemar, paired bootstrap, Cohen's kappa, prompt-list hashes
    training / attribution / evaluate_run   what the top-level entry points run (evaluate_run: ablation)
    study_verdicts / study_report   the SSAH study's criteria and report
"""

__version__ = "0.1.0"


def _register_resolvers() -> None:
    """OmegaConf resolvers the configs use (registered on import, before any entry point resolves a config)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("complement"):  # ${complement:p} = 1 - p, e.g. the benign share of a mixture
        OmegaConf.register_new_resolver("complement", lambda p: 1.0 - float(p))


_register_resolvers()
