"""Judges of completions: refusal judges (`judge` config group) and the harmfulness probe (`harm_judge`)."""
