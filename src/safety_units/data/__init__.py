"""Rows, prompts and batches: sources with field mappings, chat rendering, generation, the training datamodule, pair data,
the calibration batches of the scorers."""
