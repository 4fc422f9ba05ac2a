"""PredictionsSaverCallback: streamed, chunked, resumable gzip submission.

The callback is driven directly with synthetic probability maps (smooth blobs at
64x96, deterministic per name), so no model is needed.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import signal
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from carvana.data.layout import ORIG_HEIGHT, ORIG_WIDTH
from carvana.data.postprocess import upsample_mask
from carvana.submission.predictions import HEADER_LINE, PredictionsSaverCallback, upsample_masks_torch
from carvana.data.rle import rle_decode

H, W = 64, 96
TESTS_DIR = Path(__file__).resolve().parent
SRC_DIR = TESTS_DIR.parent / "src"


def make_names(n: int, prefix: str = "") -> list[str]:
    return [f"{prefix}{i:012x}_{i % 16 + 1:02d}.jpg" for i in range(n)]


def synthetic_prob(name: str, stripes: bool = False) -> np.ndarray:
    """A few Gaussian blobs, seeded by the name; ``stripes`` adds many runs per mask row."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    p = np.zeros((H, W), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        sy, sx = rng.uniform(4, H / 3), rng.uniform(4, W / 3)
        p = np.maximum(p, np.exp(-((yy - cy) ** 2 / (2 * sy**2) + (xx - cx) ** 2 / (2 * sx**2))))
    if stripes:
        p = 0.5 * p + 0.5 * (0.5 + 0.5 * np.sin(xx * (2 * np.pi * 6 / W) + rng.uniform(0, 2 * np.pi)))
    return p.astype(np.float32)


def feed(
    cb: PredictionsSaverCallback, names: list[str], batch: int = 2, tensor: bool = False, stripes: bool = False
) -> None:
    """Play the trainer: one on_predict_batch_end per batch, in order."""
    for i in range(0, len(names), batch):
        part = names[i : i + batch]
        probs = np.stack([synthetic_prob(n, stripes) for n in part])
        if tensor:
            import torch  # only where needed: the kill test's child process imports this module

            probs = torch.from_numpy(probs)
        cb.on_predict_batch_end(None, part, probs)


def run_full(path: Path, names: list[str], batch: int = 2, **kw) -> bytes:
    cb = PredictionsSaverCallback(path, names, **kw)
    feed(cb, cb.remaining(), batch)
    cb.on_predict_end(None)
    return path.read_bytes()


def gzip_members(data: bytes) -> int:
    n = 0
    while data:
        d = zlib.decompressobj(wbits=31)
        d.decompress(data)
        if not d.eof:
            raise ValueError("truncated gzip member")
        data, n = d.unused_data, n + 1
    return n


def side(path: Path) -> Path:
    return path.with_name(path.name + ".partial.json")


def partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def test_rows_decode_to_the_predicted_masks(tmp_path: Path) -> None:
    names = make_names(7)
    out = tmp_path / "output" / "submit.csv.gz"
    cb = PredictionsSaverCallback(out, names, threshold=0.4, chunk_size=3, workers=2)
    assert cb.remaining() == names
    feed(cb, names, batch=2, tensor=True)
    cb.on_predict_end(None)

    assert not partial(out).exists() and not side(out).exists()
    assert cb.rows_written == 7 and cb.rows_resumed == 0 and cb.postprocess_seconds > 0
    with gzip.open(out, "rt", newline="") as f:
        assert f.readline() == HEADER_LINE
        rows = [line.rstrip("\n").split(",") for line in f]
    assert [r[0] for r in rows] == names
    for name, rle in rows:
        expected = upsample_mask(synthetic_prob(name), 0.4)
        assert expected.any() and not expected.all()  # a meaningful mask, not a trivial one
        np.testing.assert_array_equal(rle_decode(rle).astype(bool), expected)


def test_chunk_sizes_give_identical_content_in_multiple_members(tmp_path: Path) -> None:
    names = make_names(7)
    texts = {}
    for cs in (1, 3, 50):
        out = tmp_path / f"cs{cs}" / "submit.csv.gz"
        data = run_full(out, names, batch=2, chunk_size=cs)
        assert gzip_members(data) == math.ceil(len(names) / cs)
        with gzip.open(out, "rb") as f:  # the standard reader reads across members
            texts[cs] = f.read()
    assert texts[1] == texts[3] == texts[50]
    lines = texts[1].decode().splitlines()
    assert lines[0] + "\n" == HEADER_LINE and len(lines) == 1 + len(names)


def _traced_peak(tmp_path: Path, n: int) -> int:
    names = make_names(n, prefix=f"n{n}")
    cb = PredictionsSaverCallback(tmp_path / f"mem{n}.csv.gz", names, chunk_size=8, workers=1, max_pending=8)
    tracemalloc.start()
    try:
        feed(cb, names, batch=4, stripes=True)
        cb.on_predict_end(None)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_is_flat_in_the_number_of_images(tmp_path: Path) -> None:
    # Measured in-process with tracemalloc, not as a child's ru_maxrss: RSS is dominated by
    # interpreter + numpy/cv2 (and torch) import overhead and ru_maxrss can't be reset, while
    # tracemalloc sees exactly the buffers numpy/cv2 allocate during the streaming loop.
    # Striped maps give ~100 KB rows, so keeping all rows (or masks) would show clearly.
    n = 16  # a multiple of chunk_size: both runs end on a full chunk
    small, big = _traced_peak(tmp_path, n), _traced_peak(tmp_path, 10 * n)
    assert small >= ORIG_HEIGHT * ORIG_WIDTH  # the per-image full-resolution work is measured
    assert big <= 1.10 * small, (small, big)


CHILD = """
import os, signal, sys
from pathlib import Path
sys.path[:0] = [{src!r}, {tests!r}]
from test_predictions import feed, make_names
from carvana.submission.predictions import PredictionsSaverCallback

names = make_names({n})
cb = PredictionsSaverCallback(Path(sys.argv[1]), names, chunk_size=3, workers=2, max_pending=1)
feed(cb, names[:11], batch=2)  # max_pending=1: >= 2 chunks are on disk, a 3rd may be mid-write
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_killed_midway_resumes_to_an_identical_file(tmp_path: Path) -> None:
    n = 20
    names = make_names(n)
    reference = run_full(tmp_path / "ref" / "submit.csv.gz", names, batch=3, chunk_size=3)

    out = tmp_path / "out" / "submit.csv.gz"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(src=str(SRC_DIR), tests=str(TESTS_DIR), n=n))
    proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()
    done = json.loads(side(out).read_text())["chunks_done"]
    assert done >= 2

    cb = PredictionsSaverCallback(out, names, chunk_size=3)
    assert cb.chunks_done == done and cb.remaining() == names[3 * done :]
    feed(cb, cb.remaining(), batch=4)  # batch boundaries needn't match chunk boundaries
    cb.on_predict_end(None)
    assert cb.rows_resumed + cb.rows_written == n
    assert gzip.decompress(out.read_bytes()) == gzip.decompress(reference)
    assert out.read_bytes() == reference


def _interrupt_after(out: Path, names: list[str], fed: int, **kw) -> PredictionsSaverCallback:
    cb = PredictionsSaverCallback(out, names, max_pending=1, **kw)
    feed(cb, names[:fed], batch=1)
    cb.on_exception(None, KeyboardInterrupt())
    return cb


def test_on_exception_keeps_complete_chunks_and_no_final_file(tmp_path: Path, capsys) -> None:
    names = make_names(10)
    out = tmp_path / "submit.csv.gz"
    cb = _interrupt_after(out, names, fed=7, chunk_size=3)
    assert "resumes from chunk 2" in capsys.readouterr().err
    assert not out.exists()
    assert json.loads(side(out).read_text())["chunks_done"] == cb.chunks_done == 2
    text = gzip.decompress(partial(out).read_bytes()).decode()
    assert text.splitlines()[1:] and [r.split(",")[0] for r in text.splitlines()[1:]] == names[:6]
    with pytest.raises(RuntimeError, match="already finished"):
        feed(cb, names[7:8])


def test_resume_truncates_a_half_written_member(tmp_path: Path) -> None:
    names = make_names(10)
    reference = run_full(tmp_path / "ref.csv.gz", names, chunk_size=3)
    out = tmp_path / "submit.csv.gz"
    _interrupt_after(out, names, fed=7, chunk_size=3)
    good = partial(out).stat().st_size
    torn = gzip.compress(b"x" * 5000 + b"junk\n", mtime=0)
    with open(partial(out), "ab") as f:  # what a crash in the middle of a chunk write leaves
        f.write(torn[: len(torn) // 2])

    cb = PredictionsSaverCallback(out, names, chunk_size=3)
    assert partial(out).stat().st_size == good
    assert cb.remaining() == names[6:]
    feed(cb, cb.remaining(), batch=3)
    cb.on_predict_end(None)
    assert out.read_bytes() == reference


def test_other_fingerprint_starts_fresh(tmp_path: Path) -> None:
    names = make_names(10)
    out = tmp_path / "submit.csv.gz"
    _interrupt_after(out, names, fed=7, chunk_size=3, threshold=0.5)
    for other in ({"names": names[::-1]}, {"chunk_size": 4}, {"threshold": 0.3}):
        kw = {"names": names, "chunk_size": 3, "threshold": 0.5} | other
        cb = PredictionsSaverCallback(out, **kw)
        assert cb.remaining() == kw["names"] and cb.chunks_done == 0
        assert partial(out).stat().st_size == 0 and not side(out).exists()
    # The last one (threshold 0.3) runs to completion with nothing left over from the 0.5 run.
    feed(cb, cb.remaining())
    cb.on_predict_end(None)
    assert out.read_bytes() == run_full(tmp_path / "ref.csv.gz", names, chunk_size=3, threshold=0.3)


def test_nothing_remaining_just_finalizes(tmp_path: Path, monkeypatch) -> None:
    names = make_names(6)
    out = tmp_path / "submit.csv.gz"
    real_replace = os.replace

    def crash_on_final_rename(src, dst):
        if Path(dst) == out:
            raise OSError("simulated crash before the final rename")
        real_replace(src, dst)

    monkeypatch.setattr("carvana.submission.predictions.os.replace", crash_on_final_rename)
    with pytest.raises(OSError, match="simulated"):
        run_full(out, names, chunk_size=3)  # every chunk is on disk, never renamed
    monkeypatch.undo()

    cb = PredictionsSaverCallback(out, names, chunk_size=3)
    assert cb.remaining() == []
    cb.on_predict_end(None)
    assert cb.rows_resumed == 6 and cb.rows_written == 0
    assert out.read_bytes() == run_full(tmp_path / "ref.csv.gz", names, chunk_size=3)


def test_wrong_order_or_unexpected_names_raise(tmp_path: Path) -> None:
    names = make_names(4)
    cb = PredictionsSaverCallback(tmp_path / "s.csv.gz", names, chunk_size=2)
    probs = np.stack([synthetic_prob(n) for n in names[:2]])
    with pytest.raises(ValueError, match=r"got '.*_02\.jpg', expected '.*_01\.jpg'"):
        cb.on_predict_batch_end(None, names[1::-1], probs)
    with pytest.raises(ValueError, match="unexpected image at prediction #1"):
        cb.on_predict_batch_end(None, [names[0], "stranger_01.jpg"], probs)
    with pytest.raises(ValueError, match="shape"):
        cb.on_predict_batch_end(None, names[:1], probs)
    feed(cb, names[:2])
    with pytest.raises(ValueError, match="first missing"):
        cb.on_predict_end(None)
    feed(cb, names[2:])
    with pytest.raises(ValueError, match="end of names"):
        cb.on_predict_batch_end(None, names[:1], probs[:1])
    cb.on_predict_end(None)  # the errors left the stream usable
    with gzip.open(tmp_path / "s.csv.gz", "rt") as f:
        assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == names


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"names": []}, "empty"),
        ({"names": ["a_01.jpg", "a_01.jpg"]}, "unique"),
        ({"names": ["a,b_01.jpg"]}, "invalid image name"),
        ({"chunk_size": 0}, ">= 1"),
        ({"threshold": 1.5}, r"\[0, 1\]"),
        ({"max_pending": 0}, "max_pending"),
    ],
)
def test_bad_arguments_are_rejected(tmp_path: Path, kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PredictionsSaverCallback(tmp_path / "s.csv.gz", **({"names": make_names(2)} | kw))


def test_torch_upsampling_matches_cv2_except_at_the_threshold() -> None:
    # The CUDA path's function, run on a CPU tensor: same sampling as upsample_mask.
    torch = pytest.importorskip("torch")
    names = make_names(3)
    probs = np.stack([synthetic_prob(n, stripes=True) for n in names])
    masks = upsample_masks_torch(torch.from_numpy(probs), 0.5)
    assert masks.shape == (3, ORIG_HEIGHT, ORIG_WIDTH) and masks.dtype == bool
    for prob, mask in zip(probs, masks):
        up = cv2.resize(prob, (ORIG_WIDTH, ORIG_HEIGHT), interpolation=cv2.INTER_LINEAR)
        differ = mask != upsample_mask(prob, 0.5)
        assert np.all(np.abs(up[differ] - 0.5) < 1e-4)
