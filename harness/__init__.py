"""Adversarial-robustness benchmark harness: spec -> trained defenses -> attack matrix -> store -> leaderboards."""
import os
import platform

__version__ = "0.1.0"

# Bit-identical boards on other x86-64 machines. Training turns a last-bit difference into a different model, and
# PyTorch's CPU kernels pick their vector code by processor: ATen's own loops (AVX2 or AVX-512), MKL's BLAS and
# oneDNN's convolutions. The quick board regenerated on another machine of this workplace differed by up to 5 points
# per cell. With these three pinned to code every x86-64 processor since 2013 runs (and Adam fused, see
# defenses/train.py), the trained weights of every recipe family and the adversarial examples of our attacks were
# bit-identical on an AVX-512 AMD EPYC and on QEMU's Intel Haswell and AMD Zen 3 (tests/test_reproducible.py);
# torchattacks' APGD at L2 was not (its square roots go through MKL's vector math, which no setting pins). Each is
# read when PyTorch first computes, so this runs at import, before our code computes; a value the user exported
# wins (e.g. ATEN_CPU_CAPABILITY=avx512 for speed), and every cell's provenance records what was in effect.
PINNED_CPU_NUMERICS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX2"}
if platform.machine().lower() in ("x86_64", "amd64"):
    for _name, _value in PINNED_CPU_NUMERICS.items():
        os.environ.setdefault(_name, _value)
