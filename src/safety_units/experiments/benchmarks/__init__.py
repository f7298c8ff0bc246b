"""What the project's operations cost, measured in one run each (benchmarks/*.py are the command lines): attribution
per method and per scorer, masked training steps, steering at generation time, a run's logging, and the projected
wall time of the study and the defense benchmark."""
