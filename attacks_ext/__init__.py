"""Attacks: our own (reference PGD, and later the source documents' families) and adapters that put
torchattacks and ART behind one interface. Importing this package registers every attack in ATTACKS."""
from attacks_ext.base import Attack  # noqa: F401
from attacks_ext import adapters, autoattack, checks, onestep, pgd, second_order  # noqa: F401  (registration side effects)
from attacks_ext import attack_checks, comparison_checks, convergence_check, reference_check  # noqa: F401  (after checks)
