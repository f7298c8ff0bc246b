"""Jain et al.'s synthetic task x concept testbed: world.py (the generator and its tokenizer), model.py
(model=synthetic: a small Llama pretrained on the world, cached and resumable), data.py (data=synthetic: safety
fine-tuning data for sft, dpo and unlearning)."""
