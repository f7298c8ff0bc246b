"""Fine-tuning around the units (`python train.py`): freeze= strategies, callbacks, drift, the fit."""
