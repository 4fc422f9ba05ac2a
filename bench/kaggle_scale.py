#!/usr/bin/env python
"""The Kaggle-scale prediction: all 100,064 test names of the competition into one submission.

What ``python main.py --no-train`` runs after loading the model (``pipeline/binary.submit``):
``EnsemblePredictor`` over the checkpoint, ``predict_to_submission`` with main.py's default
prediction settings (batch 8, 2 loader workers, 2 post-processing threads, flip TTA, fast
decode, automatic evaluation streams), then ``validate_submission`` against the official
``sample_submission.csv``. The images: the real names from
``../shared/carvana-official/sample_submission.csv``, each a symbolic link to one of the 64
real test photos of ``../shared/carvana-sample/test`` in turn (the decoder, the network and
the RLE see real photos; only their number is repeated).

Prints the wall time, images/s, and the resident memory sampled every 2 s: the main process,
and its loader workers together (shared pages counted in each), at 10% of the run and at
its end, and the peak: memory that stays flat is what lets the real test set stream
through.

Usage (from the repository root)::

    python bench/kaggle_scale.py --checkpoint output/models/<run>/best.pt [--images N] [--eval-streams S] [--engine E]
        [--int8] [--no-amp] [--isa native|avx2]

``--images N`` predicts the first N names only (a quick check); the default is all of them.
``--int8`` is main.py's (OpenVINO, calibrated on the sample's train images; the quantization
counts in the wall time, main.py's accuracy gate is not run). ``--no-amp``: fp32, what a CPU
without bf16 runs; ``--isa avx2`` adds the AVX2 limit of bench/isa.py (implies ``--no-amp``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from isa import ISAS, isa_line, rerun_limited  # noqa: E402

from carvana.models.registry import output_size  # noqa: E402
from carvana.submission.ensemble import EnsemblePredictor, load_members  # noqa: E402
from carvana.submission.sharded import predict_to_submission  # noqa: E402
from carvana.submission.validate import expected_names, validate_submission  # noqa: E402

SHARED = REPO.parent / "shared"
OFFICIAL = SHARED / "carvana-official" / "sample_submission.csv"
PHOTOS = SHARED / "carvana-sample" / "test"


def rss_mb(pid: int) -> float:
    """Resident memory of one process in MB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


class MemorySampler(threading.Thread):
    """(seconds, main MB, workers MB) every ``interval`` seconds until stopped."""

    def __init__(self, interval: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.interval, self.samples, self._stop_event = interval, [], threading.Event()
        self.start_time = time.perf_counter()

    def run(self) -> None:
        me = os.getpid()
        while not self._stop_event.wait(self.interval):
            self.samples.append((time.perf_counter() - self.start_time, rss_mb(me),
                                 sum(rss_mb(c) for c in children(me))))

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def link_images(folder: Path, names: list[str]) -> list[Path]:
    photos = sorted(PHOTOS.glob("*.jpg"))
    if not photos:
        raise SystemExit(f"{PHOTOS}: no test photos (this bench needs ../shared/carvana-sample)")
    paths = []
    for i, name in enumerate(names):
        path = folder / name
        path.symlink_to(photos[i % len(photos)].resolve())
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a binary model's best.pt")
    parser.add_argument("--images", type=int, default=0, help="predict the first N names only (0 = all)")
    parser.add_argument("--eval-streams", type=int, default=0)
    parser.add_argument("--engine", default="auto", help="auto | torch | openvino | onnxruntime (main.py's --engine)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--postprocess-workers", type=int, default=2)
    parser.add_argument("--fast-decode", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--int8", action="store_true", help="main.py's --int8 (OpenVINO), calibrated on train images")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 where the CPU has it (main.py's default); --no-amp: fp32")
    parser.add_argument("--isa", choices=ISAS, default="native", help="avx2: see bench/isa.py (fp32)")
    args = parser.parse_args()
    if not OFFICIAL.is_file():
        raise SystemExit(f"{OFFICIAL}: missing (this bench needs ../shared/carvana-official)")
    status = rerun_limited(args.isa, __file__, [*sys.argv[1:], "--no-amp"])
    if status is not None:
        raise SystemExit(status)
    names = expected_names(OFFICIAL)
    names = names[: args.images] if args.images else names
    int8 = None
    if args.int8:
        from engine import sample_int8

        int8 = sample_int8()
    predictor = EnsemblePredictor(load_members([args.checkpoint], [1.0], "cpu", eval_streams=args.eval_streams,
                                               engine=args.engine, amp=args.amp, int8=int8), progress=False)
    data_hw = output_size(predictor.members[0].config)
    print(f"{len(names)} images, {predictor.describe()}, engine {args.engine}{', int8' if args.int8 else ''}, "
          f"{'bf16 where the CPU has it' if args.amp else 'fp32'}, kernels {isa_line(args.isa)}, streams "
          f"{predictor.streams}, fast decode {args.fast_decode}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "test").mkdir()
        images = link_images(folder / "test", names)
        output = folder / "submit.csv.gz"
        sampler = MemorySampler()
        sampler.start()
        start = time.perf_counter()
        predict_to_submission(predictor, images, output, data_hw, chunk_size=256, postprocess_workers=args.postprocess_workers,
                              batch_size=8, loader_workers=args.workers, tta=True, tag=predictor.tag(),
                              fast_decode=args.fast_decode, progress_interval_s=60)
        seconds = time.perf_counter() - start
        sampler.stop()
        report = validate_submission(output, names)  # the official names, or their first --images
        size_mb = output.stat().st_size / 2**20
    print(report)
    samples = sampler.samples or [(seconds, rss_mb(os.getpid()), 0.0)]
    early = next((s for s in samples if s[0] >= 0.1 * seconds), samples[0])
    print(f"RSS MB main/workers: at 10% {early[1]:.0f}/{early[2]:.0f}, at the end {samples[-1][1]:.0f}/"
          f"{samples[-1][2]:.0f}, peak {max(s[1] for s in samples):.0f}/{max(s[2] for s in samples):.0f}")
    print(f"Kaggle-scale prediction: {len(names)} images in {int(seconds // 60)} min {seconds % 60:.0f} s "
          f"({len(names) / seconds:.1f} images/s), submission {size_mb:.0f} MB")


if __name__ == "__main__":
    main()
