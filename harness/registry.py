"""One small generic registry: explicit names, duplicates and unknown names are errors.

Entries carry metadata given at registration (an attack's norm, family, library, whether it reads the true
label), readable without building the entry, as timm's `list_models` reads its model table.

Entries come from plugins: every module named by an entry point of the group `robustness_harness.plugins`
(pyproject's `[project.entry-points."robustness_harness.plugins"]`) is imported the first time any registry is
read, and registers its entries on import. The built-in attacks, checks, recipes, models and data sets are
registered that way too, so a user's package adds its own without editing ours.
"""
from __future__ import annotations

import enum
import importlib
import importlib.metadata
import inspect
from typing import Callable, Generic, Iterator, TypeVar

from harness.threat import Norm

T = TypeVar("T")


class UnknownEntryError(KeyError):
    """An id that is not registered; the message lists the known ids."""

    def __str__(self) -> str:  # KeyError would repr() the message and add quotes
        return str(self.args[0])


class Choice(enum.StrEnum):
    """A closed vocabulary of TOML spellings at the boundary (members compare equal to, and print as, their
    spelling); `parse` turns a spelling into a member or names the allowed ones."""

    @classmethod
    def parse(cls, value, what: str | None = None):
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(member.value for member in cls)
            raise ValueError(f"{what or cls.__name__} {value!r} unknown; allowed: {allowed}") from None


class Family(Choice):
    """What kind of attack an entry is; the sanity checks compare families against each other."""

    ONE_STEP = "one-step"
    ITERATIVE = "iterative"
    GRADIENT_FREE = "gradient-free"
    NOISE = "noise"

    @classmethod
    def parse(cls, value, what: str | None = "attack family") -> "Family":
        return super().parse(value, what)


PLUGIN_GROUP = "robustness_harness.plugins"
# This project's own entry points (pyproject.toml declares the same; a test keeps the two equal). Read directly
# only where the package was never installed (a bare source tree on PYTHONPATH), which has no entry points.
BUILTIN_PLUGINS = {"data": "harness.data", "models": "harness.models", "attacks": "attacks_ext.builtins",
                   "checks": "attacks_ext.checks", "recipes": "defenses.recipes", "defense-probes": "defenses.probes"}
_plugins_loaded = False


class PluginError(RuntimeError):
    """A plugin module that could not be imported; names the entry point and its package."""


def load_plugins() -> None:
    """Import every plugin module once (the built-ins first): each registers its entries on import."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True  # before importing: a plugin module may read a registry while it registers
    found = importlib.metadata.entry_points(group=PLUGIN_GROUP)
    ours = [e for e in found if e.dist is not None and e.dist.name == "robustness-harness"]
    modules = [(name, value, "robustness-harness") for name, value in BUILTIN_PLUGINS.items()] if not ours else \
        [(e.name, e.value, "robustness-harness") for e in ours]
    modules += [(e.name, e.value, e.dist.name if e.dist else "?") for e in found if e not in ours]
    for name, value, package in modules:
        try:
            importlib.import_module(value.split(":")[0])
        except Exception as error:
            _plugins_loaded = False
            raise PluginError(f"plugin {name!r} of package {package!r} (module {value!r}, entry-point group "
                              f"{PLUGIN_GROUP!r}) failed to import: {type(error).__name__}: {error}") from error


class Registry(Generic[T]):
    """Maps kebab-case ids to entries (factories, recipes, checks) and their metadata. `metadata`: the keys an
    entry must give at registration, each with a converter that validates it (None: free-form keywords)."""

    def __init__(self, kind: str, metadata: dict[str, Callable] | None = None, defaults: dict | None = None):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._info: dict[str, dict] = {}
        self._metadata = metadata
        self._defaults = defaults or {}

    def register(self, name: str, entry: T | None = None, **metadata):
        """Register `entry` under `name` with its metadata; without `entry`, works as a decorator."""
        if not isinstance(name, str) or not name or name != name.strip().lower() or " " in name:
            raise ValueError(f"{self.kind} id must be a non-empty lower-case kebab-case string, got {name!r}")
        info = {**self._defaults, **metadata}
        if self._metadata is not None:
            missing = sorted(set(self._metadata) - set(info))
            unknown = sorted(set(info) - set(self._metadata))
            if missing or unknown:
                raise ValueError(f"{self.kind} {name!r}: metadata {'missing ' + ', '.join(missing) if missing else ''}"
                                 f"{'; ' if missing and unknown else ''}{'unknown ' + ', '.join(unknown) if unknown else ''}"
                                 f"; a {self.kind} gives {', '.join(self._metadata)}")
            info = {key: convert(info[key]) for key, convert in self._metadata.items()}

        def add(item: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = item
            self._info[name] = {**info, "module": getattr(item, "__module__", "?")}
            return item

        return add if entry is None else add(entry)

    def get(self, name: str) -> T:
        load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise UnknownEntryError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def info(self, name: str) -> dict:
        """The entry's metadata (and the module that registered it), without building the entry."""
        self.get(name)
        return dict(self._info[name])

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        load_plugins()
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        load_plugins()
        return len(self._entries)

    def items(self) -> list[tuple[str, T]]:
        load_plugins()
        return sorted(self._entries.items())


def check_keywords(function: Callable, options: dict, what: str) -> None:
    """Raise ValueError unless every key of `options` is a keyword `function` takes; the message lists them."""
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    allowed = [name for name, p in parameters.items() if name != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option {', '.join(map(repr, unknown))} for {what}; allowed: {', '.join(allowed) or '(none)'}")


def _flag(value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _library(value) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"library must be a non-empty name such as 'ours', 'torchattacks', 'ART', got {value!r}")
    return value


def _shape(value) -> tuple[int, ...]:
    if not isinstance(value, tuple) or len(value) != 3 or not all(isinstance(v, int) and v > 0 for v in value):
        raise ValueError(f"input_shape must be (channels, height, width), got {value!r}")
    return value


def _classes(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(f"classes must be an integer >= 2, got {value!r}")
    return value


ATTACKS: Registry[Callable] = Registry("attack", metadata={"norm": Norm.parse, "family": Family.parse,
                                                            "library": _library, "uses_true_label": _flag},
                                       defaults={"library": "ours", "uses_true_label": True})
DEFENSES: Registry[Callable] = Registry("defense recipe")
MODELS: Registry[Callable] = Registry("model", metadata={"input_shape": _shape})  # the input it is built for
DATASETS: Registry[Callable] = Registry("dataset", metadata={"input_shape": _shape, "classes": _classes,
                                                              "needs_files": _flag})  # needs_files: reads data_dir
CHECKS: Registry[Callable] = Registry("check")
def _shared(value) -> tuple[str, ...] | None:
    if value is not None and (not isinstance(value, tuple) or not all(isinstance(v, str) for v in value)):
        raise ValueError(f"shared must be None or a tuple of array names, got {value!r}")
    return value


PROBES: Registry[Callable] = Registry("probe", metadata={"shared": _shared})  # measurements of a model that checks request; metadata `shared`:
#   the array names every batch gives alike, for probes run batch by batch (None: the probe takes all examples)
