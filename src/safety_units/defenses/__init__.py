"""Defenses against harmful fine-tuning (the `defense` config group): one module per defense, each a Defense (base)."""
