"""The judges' validation reports: refusal judges against human labels (results/judges.md) and the harmfulness judge
against BeaverTails' labels (results/harm_judge.md)."""
