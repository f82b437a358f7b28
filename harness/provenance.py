"""Provenance of every stored cell: library versions and the code commit."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def library_versions() -> dict[str, str]:
    import numpy

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    for name, module in (("art", "art"), ("torchattacks", "torchattacks"), ("pyautoattack", "pyautoattack")):
        try:
            versions[name] = __import__(module).__version__
        except ImportError:
            versions[name] = "not installed"
    versions["cpu numerics"] = cpu_numerics()
    return versions


def cpu_numerics() -> str:
    """The vector code PyTorch computes with on the CPU (harness/__init__.py pins it): boards trained with different
    numerics differ in the last bits, and training makes those bits different models."""
    import os

    from harness import PINNED_CPU_NUMERICS

    settings = [torch.backends.cpu.get_cpu_capability()] + [
        f"{name}={os.environ[name]}" for name in PINNED_CPU_NUMERICS if name != "ATEN_CPU_CAPABILITY" and name in os.environ]
    return " ".join(settings)


OUTPUTS = ("leaderboards",)  # what the harness writes into the tree: regenerating the boards leaves the code clean


def code_commit(root: Path = REPO_ROOT) -> str:
    """The git commit of the harness code, with '-dirty' when tracked files other than the generated boards
    differ from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                *(f":(exclude){output}" for output in OUTPUTS)], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")
