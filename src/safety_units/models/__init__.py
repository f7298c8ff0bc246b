"""The model and what trains it: loading, forward helpers, sharded-weight checks, LoRA, the objectives, the
LightningModule."""
