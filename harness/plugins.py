"""Importing this module registers every built-in data set, model, recipe and attack."""
import attacks_ext  # noqa: F401
import defenses.recipes  # noqa: F401
import harness.data  # noqa: F401
import harness.models  # noqa: F401
