"""Attacks: the interface (`base.py`), our own attacks (PGD, the one-step family, S-O, label-leak scoring),
adapters that put torchattacks, ART and AutoAttack behind it, and the sanity checks (`checks/`).

Importing this package registers nothing: the registries import `attacks_ext.builtins` and
`attacks_ext.checks` through their entry points (see `harness.registry`), so importing one attack does not
pull in the others, the checks or the plotting."""
