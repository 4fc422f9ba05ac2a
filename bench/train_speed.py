#!/usr/bin/env python
"""Training speed on a CPU: eager NCHW against channels_last and torch.compile (inductor).

Times the training step the recipes run (UNet1024, uint8 batch -> normalised float, forward,
fp32 boundary-weighted BCE + Dice, backward, AdamW step) on synthetic batches, for each
variant:

* ``eager``     NCHW, eager: what CarvanaClassifier runs on a CPU today (the baseline)
* ``eager-cl``  channels_last model and input, eager
* ``compile``   ``torch.compile(model)`` (inductor, default mode), NCHW
* ``compile-cl`` compiled and channels_last

in fp32, or in bf16 autocast with ``--amp`` (only where the CPU has native bf16). Variants
are interleaved round by round (the order rotates) and the figure is the **median of
per-round ratios** against ``eager`` of the same round, because other processes may share the
machine. The first compiled steps (inductor's compile, seconds to minutes) are timed apart
and reported as ``compile s``; every variant gets the same warm-up steps before timing.

``--isa avx2`` re-runs this bench in a child process whose ATen kernels, oneDNN and
inductor's generated code are limited to AVX2 (``ATEN_CPU_CAPABILITY=avx2``,
``ONEDNN_MAX_CPU_ISA=AVX2``, inductor ``simdlen`` 256): an emulation of a CPU without
AVX-512 on one that has it (same cores, caches and clocks otherwise).

Usage (from the repository root)::

    python bench/train_speed.py [--input-size 320x448] [--width 0.25] [--batch-size 2]
        [--steps 6] [--rounds 5] [--warmup 3] [--variants eager,eager-cl,compile,compile-cl]
        [--amp] [--isa native|avx2] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from isa import ISAS, rerun_limited  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input-size", default="320x448")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="timed training steps per variant and round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before the first round")
    p.add_argument("--variants", default="eager,eager-cl,compile,compile-cl")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CPUs with native bf16 only)")
    p.add_argument("--isa", choices=ISAS, default="native", help="avx2: see bench/isa.py")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    return p.parse_args(argv)


def cpu_line() -> str:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("flags")), [])
    wanted = [f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2", "avx_vnni"))]
    return f"{model}, {os.cpu_count()} cores, flags {' '.join(sorted(set(wanted)))}"


def make_variant(name: str, args: argparse.Namespace):
    """(step function, model) for a variant: one training step per call, returning the loss."""
    import torch

    from carvana.models.unet1024 import UNet1024, parse_input_size
    from carvana.training.losses import BCEDiceLoss

    torch.manual_seed(0)
    h, w = parse_input_size(args.input_size)
    model = UNet1024(width=args.width)
    cl = name.endswith("-cl")
    fmt = torch.channels_last if cl else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    net = torch.compile(model) if name.startswith("compile") else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-6)
    loss_fn = BCEDiceLoss(0.5, 2.0, boundary_weight=3.5, boundary_band=2)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (args.batch_size, 3, h, w), dtype=torch.uint8, generator=g)
    masks = (torch.rand(args.batch_size, 1, h, w, generator=g) > 0.5).float()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255

    def step() -> float:
        x = ((images.float() - mean) / std).contiguous(memory_format=fmt)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp):
            logits = net(x)
        loss = loss_fn(logits.float(), masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)

    return step


def run(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    simdlen = os.environ.get("CARVANA_BENCH_SIMDLEN")
    if simdlen:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.simdlen = int(simdlen)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "eager" not in names:
        names.insert(0, "eager")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_line()}, isa {args.isa}, "
          f"{'bf16 autocast' if args.amp else 'fp32'}, UNet1024 width {args.width} at {args.input_size}, "
          f"batch {args.batch_size}")
    steps, first = {}, {}
    for name in names:
        step = make_variant(name, args)
        t = time.perf_counter()
        step()  # the compiled variants compile here
        first[name] = time.perf_counter() - t
        for _ in range(args.warmup):
            step()
        steps[name] = step
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            rates[name].append(args.steps * args.batch_size / (time.perf_counter() - t))
    print(f"{'variant':<12} {'images/s':>9} {'x eager':>8} {'first step s':>13}")
    for name in names:
        ratio = statistics.median(a / b for a, b in zip(rates[name], rates["eager"]))
        print(f"{name:<12} {statistics.median(rates[name]):9.2f} {ratio:8.2f} {first[name]:13.1f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    status = rerun_limited(args.isa, __file__, argv if argv is not None else sys.argv[1:])
    if status is not None:
        return status
    sys.path.insert(0, str(REPO / "src"))
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
