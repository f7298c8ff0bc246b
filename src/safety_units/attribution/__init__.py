"""Which units matter: one module per scorer (the `scoring` config group, each YAML's `_target_` a base.Scorer), the
machinery they share (scoring), the pipeline of `python attribute.py`, and the selection a freeze= or ablate= config
makes from a unit map."""
