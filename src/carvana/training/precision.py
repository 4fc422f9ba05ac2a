"""Which floating-point precision and memory format the classifier runs in, decided once.

* CUDA: bf16 autocast where the GPU computes bf16 natively (compute capability 8.0+: A100,
  H100, L4, RTX 30xx...), else fp16 with a GradScaler (T4, P100, V100); channels_last.
* CPU: bf16 autocast where the CPU computes bf16 natively (Intel AMX-BF16 or AVX512-BF16,
  which oneDNN uses for convolutions); fp32 elsewhere, because emulated bf16 is slower than
  fp32. The decision is a capability check, not a timed probe: a probe on a shared machine
  could pick differently from one run to the next, and the precision changes the numbers.
  channels_last on the CPU for inference only: measured faster there, slower for training
  (bench/cpu_amp.py; see use_channels_last).

``--no-amp`` (``amp=False``) forces fp32 everywhere. Autocast only changes the dtype of
activations: parameters, gradients, optimiser state and therefore checkpoints stay fp32.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 dot products


@dataclass(frozen=True)
class Precision:
    """The autocast dtype (None = plain fp32), its short name and why it was chosen."""

    dtype: torch.dtype | None
    name: str  # "bf16" | "fp16" | "fp32": recorded in hparams.json as `precision`
    reason: str

    def describe(self) -> str:
        """One console line, e.g. 'precision: bf16 autocast (CPU has native bf16: amx_bf16)'."""
        what = "fp32" if self.dtype is None else f"{self.name} autocast"
        return f"precision: {what} ({self.reason})"


def cpuinfo_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The kernel's list of CPU instruction-set flags (Linux); an empty set elsewhere."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return flags


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The native-bf16 CPU features present, e.g. ['amx_bf16', 'avx512_bf16']; [] if none.

    Reads the kernel's flag list (Linux); elsewhere asks torch's own CPU detection (what
    oneDNN dispatches on), where AMX tiles stand for AMX-BF16 (every AMX CPU has both).
    """
    flags = cpuinfo_flags(cpuinfo)
    if flags:
        return [f for f in CPU_BF16_FLAGS if f in flags]
    probes = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    try:
        return [flag for flag, fn in probes.items() if getattr(torch.cpu, fn)()]
    except (AttributeError, RuntimeError):  # private helpers: absent in some torch builds
        return []


def cuda_native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether the CUDA ``device`` computes bf16 natively, and its compute capability as 'sm_XY'.

    Not torch.cuda.is_bf16_supported() alone: it also answers True where bf16 is only emulated
    (a T4's sm_75, a P100's sm_60), which is slower than fp16 there. ROCm reports its own.
    """
    major, minor = torch.cuda.get_device_capability(device)
    arch = f"sm_{major}{minor}"
    if torch.version.hip:
        return bool(torch.cuda.is_bf16_supported()), arch
    return major >= 8, arch


def choose_precision(device: torch.device, amp: bool) -> Precision:
    """The precision the classifier runs in on ``device`` (see the module docstring)."""
    if not amp:
        return Precision(None, "fp32", "--no-amp")
    if device.type == "cuda":
        native, arch = cuda_native_bf16(device)
        if native:
            return Precision(torch.bfloat16, "bf16", f"CUDA device {arch} has native bf16")
        return Precision(torch.float16, "fp16", f"CUDA device {arch} without native bf16: fp16 with a gradient scaler")
    if device.type == "cpu":
        flags = cpu_bf16_flags()
        if flags:
            return Precision(torch.bfloat16, "bf16", f"CPU has native bf16: {', '.join(flags)}")
        return Precision(None, "fp32", "CPU without native bf16 (no amx_bf16 / avx512_bf16): emulated bf16 is slower")
    return Precision(None, "fp32", f"no mixed precision on {device.type}")


def autocast_context(device_type: str, dtype: torch.dtype | None) -> AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device_type`` ("cuda", "cpu"); a no-op for None (fp32)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def use_channels_last(device: torch.device, requested: bool, inference: bool = False) -> bool:
    """channels_last where it was measured faster: CUDA (training and inference) and CPU inference.

    On this project's 2-core Xeon with AMX-bf16 (bench/cpu_amp.py, torch's 2 threads, wall
    clock, idle, UNet1024 width 0.25, batch 4) channels_last made CPU *training* slower in every
    precision: bf16 1.78-2.12x fp32 NCHW in NCHW, but 0.76-0.81x in channels_last; fp32
    0.79-0.82x. CPU *inference* through the folded copy (training/inference.py) is faster in
    channels_last: bf16 1.71-2.13x fp32 NCHW, against 1.27-1.43x in NCHW. (An earlier
    one-thread CPU-time measurement under heavy load had favoured channels_last for training
    too; the two-thread wall clock is what a run sees.) ``--no-channels-last`` turns it off.
    """
    if not requested:
        return False
    return device.type == "cuda" or (inference and device.type == "cpu")
