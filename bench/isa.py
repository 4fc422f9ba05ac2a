"""Emulating a CPU without AVX-512 on one that has it, for the benches (not for main.py).

``ATEN_CPU_CAPABILITY=avx2`` limits PyTorch's ATen kernels, ``ONEDNN_MAX_CPU_ISA=AVX2`` limits
oneDNN: PyTorch's copy and OpenVINO's (its convolutions report ``brgconv_avx2_*`` then; OpenVINO's
own non-oneDNN kernels are not capped by a release wheel). ``CARVANA_BENCH_SIMDLEN`` tells a
bench to set inductor's vector length to 256 bits. Same cores, caches and clocks otherwise: an
emulation of an AVX2-only CPU, not a measurement of one. Each variable is read once, when the
library loads, so the bench re-runs itself in a child process with them set.
"""

from __future__ import annotations

import os
import subprocess
import sys

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "CARVANA_BENCH_SIMDLEN": "256"}
ISAS = ("native", "avx2")


def emulating_avx2() -> bool:
    """True inside the child process that :func:`rerun_limited` started."""
    return all(os.environ.get(k) == v for k, v in AVX2_ENV.items())


def rerun_limited(isa: str, script: str, argv: list[str]) -> int | None:
    """With ``isa == 'avx2'`` outside the emulation: run ``script argv`` again in a child limited
    to AVX2 and return its exit status. None means: go on in this process."""
    if isa not in ISAS:
        raise SystemExit(f"--isa {isa!r}: expected one of {', '.join(ISAS)}")
    if isa == "native" or emulating_avx2():
        return None
    return subprocess.call([sys.executable, script, *argv], env={**os.environ, **AVX2_ENV})


def isa_line(isa: str) -> str:
    """How the kernels were limited, for a bench's header line."""
    if isa == "avx2":
        return "emulated AVX2 (" + " ".join(f"{k}={v}" for k, v in AVX2_ENV.items() if k != "CARVANA_BENCH_SIMDLEN") + ")"
    return "native"
