"""Activation steering at inference (the `steer` config group): SCANS and refusal-direction ablation."""
