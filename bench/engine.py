#!/usr/bin/env python
"""Prediction engines A/B: torch against OpenVINO (bf16 where the CPU has it, and fp32, and int8)
and ONNX Runtime, interleaved round by round, through the real prediction path.

Each variant runs what ``python main.py --no-train`` runs (``load_members`` with ``--engine``,
``predict_to_submission``: batch 8, 2 loader workers, 2 post-processing threads, flip TTA,
fast decode, automatic evaluation streams) on N images made as bench/kaggle_scale.py makes
them (official test names, each a link to one of the 64 real test photos in turn). Per variant:
images/s (median over rounds), the main process's CPU-ms per image, the images/s of the
prediction step alone (network, TTA, activation: no decoding or post-processing), the compile time (the
first compile, cache emptied, counted apart; for int8 it includes NNCF's quantization), and the
Dice of its submission against the true masks of ``../shared/carvana-sample`` (test_solution.csv)
and against torch's masks. The int8 variants (``--int8``, training/quantize.py) are calibrated on
the sample's TRAIN images, as main.py calibrates on training images: ``openvino-int8`` keeps the
first and last convolutions in float, ``openvino-int8-fullres`` also the full-resolution ones;
``openvino-int8-fp32`` is ``openvino-int8`` with ``--no-amp`` (its float layers in fp32). An
engine's variant with ``-graph1`` appended (``openvino-int8-fp32-graph1``) runs the earlier
prediction graph (``flip`` and UNet1024's concatenations, training/engines.py: ``GRAPH``).

Usage (from the repository root)::

    python bench/engine.py --checkpoint output/models/<run>/best.pt [--images 8192] [--rounds 2]
        [--isa native|avx2]

``--isa avx2`` runs the fp32 variants (torch-fp32, openvino-fp32, openvino-int8-fp32, onnxruntime)
with PyTorch's and oneDNN's kernels limited to AVX2 (bench/isa.py): an emulation of an AVX2-only
CPU. For each OpenVINO variant the bench prints the kernels its convolutions run (from the compiled
model), which shows whether the limit took effect.

Without ``--checkpoint`` a default network is trained for ``--train-epochs`` on the sample's
train images first (a quick model: its Dice against the truth is low, the comparison is what counts).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from isa import ISAS, isa_line, rerun_limited  # noqa: E402

from carvana.models.registry import output_size  # noqa: E402
from carvana.submission.ensemble import EnsemblePredictor, load_members  # noqa: E402
from carvana.submission.scoring import score_submission  # noqa: E402
from carvana.submission.sharded import predict_to_submission  # noqa: E402
from carvana.submission.validate import expected_names  # noqa: E402
from carvana.training import engines  # noqa: E402
from carvana.training.quantize import CALIBRATION_IMAGES, Int8Spec, spread  # noqa: E402

SHARED = REPO.parent / "shared"
OFFICIAL = SHARED / "carvana-official" / "sample_submission.csv"
SAMPLE = SHARED / "carvana-sample"
# name: (engine, amp, int8 scope or None)
VARIANTS = {"torch": ("torch", True, None), "torch-fp32": ("torch", False, None), "openvino": ("openvino", True, None),
            "openvino-fp32": ("openvino", False, None), "onnxruntime": ("onnxruntime", False, None),
            "openvino-int8": ("openvino", True, "ends"), "openvino-int8-fullres": ("openvino", True, "full-resolution"),
            "openvino-int8-fp32": ("openvino", False, "ends")}


GRAPH1 = "-graph1"  # a variant name + this: the same engine on the earlier prediction graph (engines.GRAPH = 1)
GRAPH = engines.GRAPH  # the current layout, kept before any variant sets engines.GRAPH


def variant_spec(variant: str) -> tuple[str, bool, str | None, int]:
    """(engine, amp, int8 scope or None, graph layout) of a variant name."""
    base = variant.removesuffix(GRAPH1)
    if base not in VARIANTS or (base != variant and VARIANTS[base][0] == "torch"):
        raise KeyError(variant)
    return (*VARIANTS[base], 1 if base != variant else GRAPH)


def sample_int8(scope: str = "ends") -> list:
    """main.py's --int8 for one member, calibrated as main.py calibrates: on up to
    CALIBRATION_IMAGES training images (the sample's), never a test photo."""
    return [Int8Spec(tuple(spread(sorted((SAMPLE / "train").glob("*.jpg")), CALIBRATION_IMAGES)), scope)]


def load_variant(checkpoint: Path, variant: str, cache: Path) -> list:
    """The checkpoint loaded as main.py loads it for ``variant`` (int8: calibrated on train images)."""
    engine, amp, scope, graph = variant_spec(variant)
    engines.CACHE_DIR, engines.GRAPH = cache, graph  # graphs are built (and keyed) on first use, after this
    int8 = sample_int8(scope) if scope is not None else None
    return load_members([checkpoint], [1.0], "cpu", amp=amp, engine=engine, int8=int8)


def link(folder: Path, names: list[str], photos: list[Path]) -> list[Path]:
    folder.mkdir(parents=True)
    out = []
    for i, name in enumerate(names):
        (folder / name).symlink_to(photos[i % len(photos)].resolve())
        out.append(folder / name)
    return out


def convolution_kernels(compiled) -> str:
    """'brgconv_avx2_I8 x20, ...': the kernels an OpenVINO CompiledModel runs its convolutions with."""
    counts: Counter = Counter()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) == "Convolution":
            counts[info["primitiveType"].astype(str)] += 1
    return ", ".join(f"{kernel} x{n}" for kernel, n in counts.most_common())


def predict(checkpoint: Path, variant: str, images: list[Path], output: Path, cache: Path,
            batch: int = 8) -> tuple[float, float, float]:
    """(seconds, main-process CPU seconds, compile seconds) of one prediction into ``output``."""
    predictor = EnsemblePredictor(load_variant(checkpoint, variant, cache), progress=False)
    member = predictor.members[0].classifier
    start = time.perf_counter()
    compiled = member.engine.compiled(True) if member.engine is not None else None  # compile or cache load
    compile_s = time.perf_counter() - start
    if compiled is not None and compiled.name == "openvino" and output.name.startswith("dice-"):
        print(f"{variant}: convolutions run {convolution_kernels(compiled.runtime)}", flush=True)
    cpu, wall = time.process_time(), time.perf_counter()
    predict_to_submission(predictor, images, output, output_size(predictor.members[0].config), chunk_size=256,
                          postprocess_workers=2, batch_size=batch, loader_workers=2, tta=True, tag=predictor.tag(),
                          fast_decode=True, progress_interval_s=600)
    return time.perf_counter() - wall, time.process_time() - cpu, compile_s


def network_rate(checkpoint: Path, variant: str, batch: int, batches: int, cache: Path) -> float:
    """Images/s of the prediction step alone (the same batch again and again through the
    predictor's streams: no decoding, no post-processing), after one warm-up batch."""
    import torch
    from functools import partial

    from carvana.submission.ensemble import size_key
    from carvana.training.streams import ordered_map

    predictor = EnsemblePredictor(load_variant(checkpoint, variant, cache), progress=False)
    hw = output_size(predictor.members[0].config)
    item = {size_key(hw): torch.randint(0, 256, (batch, 3, *hw), dtype=torch.uint8), "name": ["x"] * batch,
            "ok": torch.ones(batch, dtype=torch.bool)}
    with predictor.fixed_weights():
        predictor.average(item, tta=True)
        start = time.perf_counter()
        for _ in ordered_map(partial(predictor.average, tta=True), [item] * batches, predictor.streams):
            pass
    return batch * batches / (time.perf_counter() - start)


def relevant_flags() -> str:
    """The CPU flags that decide the kernels: AVX2, AVX-512, its bf16/VNNI, AMX."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return " ".join(f for f in wanted if f in engines.cpu_flags().split()) or "none of avx2/avx512/amx"


def quick_checkpoint(work: Path, epochs: int) -> Path:
    """A default network trained briefly on the sample's train images (no --checkpoint given)."""
    subprocess.run([sys.executable, str(REPO / "main.py"), "--data-dir", str(SAMPLE), "--epochs", str(epochs),
                    "--no-predict", "--run-name", "bench-engine", "--engine", "torch"], cwd=work, check=True)
    return work / "output" / "models" / "bench-engine" / "best.pt"


def known(variant: str) -> bool:
    try:
        variant_spec(variant)
    except KeyError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="torch,openvino,openvino-fp32,onnxruntime",
                        help="the first is the baseline; also torch-fp32 (--no-amp), for what a CPU without bf16 "
                             "runs, and openvino-int8, openvino-int8-fullres, openvino-int8-fp32 (--int8; the "
                             "last with --no-amp); an engine's variant with -graph1 appended runs the earlier "
                             "prediction graph (flip and concatenations: the A/B of the graph's layout)")
    parser.add_argument("--train-epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward (main.py's --predict-batch-size)")
    parser.add_argument("--isa", choices=ISAS, default="native",
                        help="avx2: kernels limited to AVX2, an emulation of an AVX2-only CPU (bench/isa.py); fp32 "
                             "variants only")
    args = parser.parse_args()
    if not (OFFICIAL.is_file() and (SAMPLE / "test_solution.csv").is_file()):
        raise SystemExit(f"this bench needs {OFFICIAL} and {SAMPLE}")
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if not known(v)]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}, an engine's "
                         f"with {GRAPH1} appended")
    bf16 = [v for v in variants if variant_spec(v)[1]]
    if args.isa == "avx2" and bf16:
        raise SystemExit(f"--isa avx2: the variant(s) {', '.join(bf16)} run in bf16, which an AVX2-only CPU lacks; use the "
                         "fp32 variants (torch-fp32, openvino-fp32, openvino-int8-fp32, onnxruntime)")
    status = rerun_limited(args.isa, __file__, sys.argv[1:])
    if status is not None:
        raise SystemExit(status)
    photos = sorted((SAMPLE / "test").glob("*.jpg"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = args.checkpoint.resolve() if args.checkpoint else quick_checkpoint(work, args.train_epochs)
        names = expected_names(OFFICIAL)[: args.images]
        images, sample = link(work / "test", names, photos), photos
        cache = work / "engines"
        first = {v: predict(checkpoint, v, sample, work / f"dice-{v}.csv.gz", cache)[2] for v in variants}
        dice = {v: score_submission(work / f"dice-{v}.csv.gz", SAMPLE / "test_solution.csv") for v in variants}
        # Agreement with torch: torch's own masks as the "truth" (64 sample images).
        shutil.copy(work / f"dice-{variants[0]}.csv.gz", work / "baseline.csv.gz")
        agree = {v: score_submission(work / f"dice-{v}.csv.gz", work / "baseline.csv.gz") for v in variants}
        network = {v: [] for v in variants}
        for r in range(args.rounds):
            for v in variants:
                network[v].append(network_rate(checkpoint, v, args.batch_size, max(8, 1024 // args.batch_size), cache))
        figures: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
        for r in range(args.rounds):
            for v in variants:
                seconds, cpu, _ = predict(checkpoint, v, images, work / f"run-{v}-{r}.csv.gz", cache, args.batch_size)
                figures[v].append((len(images) / seconds, 1000 * cpu / len(images)))
                (work / f"run-{v}-{r}.csv.gz").unlink()
                print(f"round {r + 1} {v}: {len(images) / seconds:.1f} images/s, main process {1000 * cpu / len(images):.2f} "
                      f"CPU-ms/image", flush=True)
    base = statistics.median(f[0] for f in figures[variants[0]])  # the first variant is the baseline
    print(f"\n{len(images)} images, batch {args.batch_size}, checkpoint {checkpoint.name}, CPU flags: {relevant_flags()}, "
          f"kernels: {isa_line(args.isa)}")
    net_base = statistics.median(network[variants[0]])
    print(f"| engine | images/s (median) | x {variants[0]} | main CPU-ms/image | network alone images/s | x {variants[0]} | "
          f"first compile s | Dice vs truth (64) | Dice vs {variants[0]} |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for v in variants:
        ips, net = statistics.median(f[0] for f in figures[v]), statistics.median(network[v])
        print(f"| {v} | {ips:.1f} | {ips / base:.2f} | {statistics.median(f[1] for f in figures[v]):.2f} | {net:.1f} | "
              f"{net / net_base:.2f} | {first[v]:.1f} | {dice[v]:.5f} | {agree[v]:.5f} |")
    best = max(variants, key=lambda v: statistics.median(f[0] for f in figures[v]))
    print(f"engine speedup: {best} {statistics.median(f[0] for f in figures[best]) / base:.2f}x {variants[0]}")


if __name__ == "__main__":
    main()
