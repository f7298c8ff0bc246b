"""Defenses against harmful fine-tuning (the `defense` config group): training-time objectives and post-hoc edits."""
