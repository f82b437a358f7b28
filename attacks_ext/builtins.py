"""The built-in attacks: importing this module (the `attacks` entry point) registers each in ATTACKS."""
from attacks_ext import adapters, autoattack, onestep, pgd, second_order  # noqa: F401  (registration side effects)
