"""The built-in attacks: importing this module (the `attacks` entry point) registers each in ATTACKS."""
from attacks_ext import (  # noqa: F401  (registration side effects)
    adapters, autoattack, autoattack_standard, onestep, pgd, second_order)
