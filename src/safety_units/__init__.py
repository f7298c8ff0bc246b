"""safety_units: find the safety-critical units of an aligned LLM and train around them.

Modules, one per concept:
    models          load the real SmolLM2, any local HF causal LM, or a tiny random Llama
    data            read CSV/JSON/JSONL, apply the chat template, mask prompt labels, the Lightning datamodule
    generation      batched greedy decoding with left padding
    units           which parameter slices make up an MLP / attention unit, per architecture
    scoring         per-unit importance scores (wifv, activation, snip), O(units) memory
    classification  ESU / EUU / CU / RU from safety and utility scores
    unit_map        the portable unit map file and its selections
    masking         freezing strategies as gradient masks, exact under AdamW decay
    module          the LightningModule
    judge           refusal judge (strings + minimum length, or a local model)
    evaluation      refusal ASR, over-refusal, multiple-choice utility, perplexity, ablation
    training / attribution / evaluate_run   what the top-level entry points run
"""

__version__ = "0.1.0"
