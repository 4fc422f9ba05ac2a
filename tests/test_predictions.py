"""PredictionsSaverCallback: the rows it streams, one gzip member, bounded memory, checked input.

The callback is driven directly with synthetic probability maps (prediction_helpers), so no
model is needed. Interruption and resuming: test_predictions_interrupted.py.
"""

from __future__ import annotations

import gzip
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from carvana.data.layout import ORIG_HEIGHT, ORIG_WIDTH
from carvana.data.postprocess import upsample_mask
from carvana.data.rle import rle_decode
from carvana.submission.predictions import HEADER_LINE, PredictionsSaverCallback, upsample_masks_torch
from prediction_helpers import feed, gzip_members, make_names, partial, run_full, side, synthetic_prob


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


def first_member_text(data: bytes) -> bytes:
    """What a decoder that reads only the first gzip member returns (one decompressobj, used once)."""
    d = zlib.decompressobj(wbits=31)
    text = d.decompress(data)
    assert d.eof, "the first member is truncated"
    return text


def test_any_chunk_size_gives_one_gzip_member_that_a_first_member_decoder_reads_whole(tmp_path: Path) -> None:
    # Fails on the old writer: it wrote one member per chunk (7, 3 and 1 members here), and a
    # first-member-only decoder saw only the header and the first chunk's rows.
    names = make_names(7)
    texts = {}
    for cs in (1, 3, 50):
        out = tmp_path / f"cs{cs}" / "submit.csv.gz"
        data = run_full(out, names, batch=2, chunk_size=cs)
        assert gzip_members(data) == 1
        texts[cs] = first_member_text(data)
        with gzip.open(out, "rb") as f:  # the standard reader agrees (and checks CRC and length)
            assert f.read() == texts[cs]
    assert texts[1] == texts[3] == texts[50]
    lines = texts[1].decode().splitlines()
    assert lines[0] + "\n" == HEADER_LINE and [r.split(",")[0] for r in lines[1:]] == names


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
    # 64 rows (~4 MB of text): enough for the final read-back check to reach its bounded window
    # (4 MB decompressed pieces, split into lines), which is now the largest buffer, since the
    # rows are encoded without a full-resolution map (upsampled_rle).
    n = 64  # a multiple of chunk_size: both runs end on a full chunk
    small, big = _traced_peak(tmp_path, n), _traced_peak(tmp_path, 10 * n)
    assert small >= ORIG_HEIGHT * ORIG_WIDTH  # a substantial working set is measured, not noise
    assert big <= 1.10 * small, (small, big)


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
