"""Defenses: declarative training recipes (`defenses.recipes`), the one training loop and the checkpoint
cache (`defenses.train`)."""
