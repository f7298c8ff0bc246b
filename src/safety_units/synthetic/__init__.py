"""Jain et al.'s synthetic task x concept testbed: world.py (the generator and its tokenizer)."""
