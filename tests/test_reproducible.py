"""Boards regenerate bit for bit on other machines: PyTorch's CPU numerics are pinned (harness/__init__.py), and
training and attacks give the same bits on an emulated processor of another vendor and generation."""
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import PINNED_CPU_NUMERICS

REPO = Path(__file__).resolve().parents[1]
X86 = platform.machine().lower() in ("x86_64", "amd64")

# Trains a small model with pgd-at (conv, linear, its PGD adversary, two steps of fused Adam) and attacks it; prints
# hashes. Under emulation every extra step costs seconds: pgd-at covers every kernel natural training uses, and a bit
# that differs in any kernel changes every hash after it, so 2 adversary steps and a 3-step attack show what 7 and 10
# did (the emulated run took 88 s instead of 159 s here; without the pins it still differs).
FINGERPRINT = """
import dataclasses, hashlib, torch
from defenses.recipes import build_recipe
from defenses.train import train
from harness.data import load_dataset
from harness.registry import ATTACKS
from harness.provenance import cpu_numerics
data = load_dataset("mnist5k")
small = dataclasses.replace(data, x_train=data.x_train[:64], y_train=data.y_train[:64])
digest = lambda tensors: hashlib.sha256(b"".join(t.detach().contiguous().numpy().tobytes() for t in tensors)).hexdigest()
out = [cpu_numerics()]
model, _ = train(build_recipe("pgd-at", epochs=1, adversary_options={"steps": 2}), small, seed=0, progress=False)
out.append(digest(model.state_dict().values()))
adversarial = ATTACKS.get("pgd-linf")(steps=3)(model, data.x_test[:16], data.y_test[:16], eps=0.3,
                                                 generator=torch.Generator().manual_seed(0))
out.append(digest([adversarial]))
print(" ".join(out))
"""


def _run(code: str, env: dict, prefix: tuple[str, ...] = ()) -> str:
    done = subprocess.run([*prefix, sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in PINNED_CPU_NUMERICS}
    return {**env, **extra}


@pytest.mark.skipif(not X86, reason="the pins name x86-64 vector code")
def test_cpu_numerics_are_pinned_at_import_unless_the_user_exports_their_own():
    code = "import harness, torch; print(torch.backends.cpu.get_cpu_capability())"
    assert _run(code, _clean_env()) == "AVX2"
    assert _run(code, _clean_env(ATEN_CPU_CAPABILITY="default")) == "DEFAULT"
    from harness.provenance import library_versions
    assert library_versions()["cpu numerics"].startswith("AVX2 MKL_CBWR=COMPATIBLE")


@pytest.mark.slow
@pytest.mark.skipif(not X86 or shutil.which("qemu-x86_64") is None,
                    reason="needs qemu-user (Debian package qemu-user; .ci/run installs it) to emulate another CPU")
def test_training_and_attacks_are_bit_identical_on_an_emulated_intel_haswell():
    """This machine (whatever it is) against QEMU's Intel Haswell: another vendor, AVX2 and no AVX-512. Without
    the pins (or with the single-tensor Adam, whose square root goes through MKL's vector math) they differ."""
    native = _run(FINGERPRINT, _clean_env())
    emulated = _run(FINGERPRINT, _clean_env(), prefix=("qemu-x86_64", "-cpu", "Haswell"))
    assert native == emulated


def test_the_drift_check_names_different_numerics_or_versions_as_the_likely_cause(tmp_path):
    from harness.reports import drift

    def board(name, value, numerics):
        path = tmp_path / name / "b.md"
        path.parent.mkdir()
        path.with_suffix(".json").write_text(__import__("json").dumps({
            "versions": {"torch": "2.13.0+cpu", "cpu numerics": numerics},
            "tables": [{"section": "s", "columns": ["Defense", "Clean"], "rows": [["a", value]]}]}))
        return path

    committed = board("old", 96.8, "AVX512")
    problems = drift.compare_files(committed, board("new", 97.8 + 1, "AVX2 MKL_CBWR=COMPATIBLE"), tolerance=1.0)
    assert problems[0] == "computed with cpu numerics AVX512 on the committed board, AVX2 MKL_CBWR=COMPATIBLE here"
    assert len(problems) == 2
    assert drift.compare_files(committed, board("same", 97.0, "AVX2"), tolerance=1.0) == []  # no drift: no cause
