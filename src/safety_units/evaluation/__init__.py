"""What a model does: the evaluation suite, judges, multiple-choice utility, paired comparisons and `python evaluate.py`."""
