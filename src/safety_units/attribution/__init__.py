"""Which units matter: one module per scorer (the `scoring` config group), the pipeline of `python attribute.py`, and
the selection a freeze= or ablate= config makes from a unit map."""
