"""Helpers every layer uses: errors, rank-zero logging, Hydra config, statistics, plots, fingerprints, run logging."""
