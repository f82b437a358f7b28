"""Adversarial-robustness benchmark harness: spec -> trained defenses -> attack matrix -> store -> leaderboards."""

__version__ = "0.1.0"
