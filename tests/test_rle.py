"""Tests for carvana.data.rle: exact agreement with the classic Kaggle encoder and the official CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carvana.data.layout import ORIG_SHAPE
from carvana.data.rle import RLEError, rle_decode, rle_encode, rle_to_runs

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "carvana-sample"


def reference_encode(img: np.ndarray) -> str:
    """The classic Kaggle encoder (on a 0/1 copy, since it compares raw values)."""
    pixels = (np.asarray(img) != 0).astype(np.uint8).flatten()
    pixels = np.concatenate([[0], pixels, [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def reference_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Loop-per-run decoder, the obvious way."""
    flat = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    nums = [int(t) for t in rle.split()]
    for start, length in zip(nums[0::2], nums[1::2]):
        flat[start - 1 : start - 1 + length] = 1
    return flat.reshape(shape)


@st.composite
def masks(draw) -> np.ndarray:
    """Random 2-D 0/1 masks: random shape and density, sometimes periodic rows."""
    h = draw(st.integers(1, 24))
    w = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["random", "blobs", "periodic"]))
    if kind == "random":
        mask = rng.random((h, w)) < draw(st.floats(0.0, 1.0))
    elif kind == "blobs":  # long runs, like a car silhouette
        mask = np.cumsum(rng.random(h * w) < 0.05) % 2 == 1
    else:  # repeating 8-pixel words: the encoder's rare equal-word path
        period = draw(st.integers(1, 9))
        pattern = rng.random(period) < 0.5
        mask = np.resize(pattern, h * w)
    mask = mask.reshape(h, w)
    if draw(st.booleans()):
        mask.flat[0] = draw(st.booleans())
        mask.flat[-1] = draw(st.booleans())
    return mask


@settings(max_examples=300, deadline=None)
@given(masks(), st.sampled_from(["bool", "uint8", "uint8x255", "int8", "int64", "float32", "fortran"]))
def test_encode_matches_reference_and_roundtrips(mask: np.ndarray, form: str) -> None:
    arr = {
        "bool": mask,
        "uint8": mask.astype(np.uint8),
        "uint8x255": mask.astype(np.uint8) * 255,
        "int8": -mask.astype(np.int8),
        "int64": mask.astype(np.int64) * 7,
        "float32": mask.astype(np.float32),
        "fortran": np.asfortranarray(mask.astype(np.uint8)),
    }[form]
    rle = rle_encode(arr)
    assert rle == reference_encode(mask)
    decoded = rle_decode(rle, mask.shape)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, mask.astype(np.uint8))


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (2, 8), (3, 5), (64, 64), (17, 31), ORIG_SHAPE])
def test_edge_masks(shape: tuple[int, int]) -> None:
    n = shape[0] * shape[1]
    zeros = np.zeros(shape, dtype=np.uint8)
    assert rle_encode(zeros) == ""
    ones = np.ones(shape, dtype=bool)
    assert rle_encode(ones) == f"1 {n}"
    for index in {0, n // 2, n - 1}:
        single = zeros.copy()
        single.flat[index] = 1
        assert rle_encode(single) == f"{index + 1} 1"
        np.testing.assert_array_equal(rle_decode(f"{index + 1} 1", shape), single)
    ends = zeros.copy()
    ends.flat[0] = ends.flat[-1] = 1
    assert rle_encode(ends) == reference_encode(ends)
    np.testing.assert_array_equal(rle_decode("", shape), zeros)


def test_full_size_patterns_match_reference() -> None:
    rng = np.random.default_rng(7)
    cases = {
        "noise": rng.random(ORIG_SHAPE) < 0.5,
        "sparse": rng.random(ORIG_SHAPE) < 0.001,
        "stripes8": np.resize(np.array([0, 0, 1, 1, 1, 1, 0, 0], bool), ORIG_SHAPE),
        "checker": (np.indices(ORIG_SHAPE).sum(0) % 2).astype(bool),
        "block": np.pad(np.ones((600, 900), bool), ((300, 380), (500, 518))),
    }
    # a car-like mask with a few repeated non-uniform words in the middle
    car = np.zeros(ORIG_SHAPE, np.uint8)
    car[400:900, 300:1600] = 1
    car[650, 800:832] = np.resize([1, 1, 1, 0, 0, 1, 1, 1], 32)
    cases["car_with_pattern"] = car
    for name, mask in cases.items():
        assert rle_encode(mask) == reference_encode(mask), name


def test_noncontiguous_and_views() -> None:
    rng = np.random.default_rng(3)
    big = rng.random((40, 50)) < 0.3
    for view in (big[::2, ::3], big[:, 5:37], big.T):
        assert rle_encode(view) == reference_encode(view)
    # bool view of 0/255 bytes: any nonzero byte counts as set
    raw = (big * 255).astype(np.uint8)
    assert rle_encode(raw.view(bool)) == reference_encode(big)


def test_encode_rejects_non_2d() -> None:
    with pytest.raises(ValueError, match="2-D"):
        rle_encode(np.zeros(10, np.uint8))
    with pytest.raises(ValueError, match="2-D"):
        rle_encode(np.zeros((2, 3, 4), np.uint8))


def test_format_ints_matches_str() -> None:
    from carvana.data.rle_encoder import _format_ints

    edges = [0, 1, 9, 10, 99, 100, 999, 1000, 9999, 10000, 10001, 10010, 99999, 100000, 1000000, 9999999]
    rng = np.random.default_rng(5)
    for values in (edges, edges[::-1], [7], rng.integers(0, 10**7, 5000), rng.integers(1, 3000, 5000)):
        values = np.asarray(values, dtype=np.int64)
        assert _format_ints(values) == " ".join(map(str, values.tolist()))
    assert _format_ints(np.empty(0, np.int64)) == ""
    # values >= 10**7 (masks over 10 Mpx) take the str() fallback
    assert _format_ints(np.array([10**7, 5, 123456789], np.int64)) == "10000000 5 123456789"
    big = np.zeros((1, 10_000_016), dtype=bool)
    big[0, 5] = big[0, -3] = True
    assert rle_encode(big) == "6 1 10000014 1"


def test_scratch_buffer_reuse_across_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    import carvana.data.rle_encoder as encoder

    rng = np.random.default_rng(11)
    shapes = [ORIG_SHAPE, (17, 31), (64, 64), ORIG_SHAPE, (3, 1000), ORIG_SHAPE]
    cases = [np.cumsum(rng.random(h * w) < 0.002).reshape(h, w) % 2 == 1 for h, w in shapes]
    for mask in cases:  # one thread, a big buffer reused for smaller masks and back
        assert rle_encode(mask) == reference_encode(mask)
    monkeypatch.setattr(encoder, "_SCRATCH_MAX", 0)  # too big to keep: a fresh buffer each call
    monkeypatch.setattr(encoder._scratch, "flags", None, raising=False)
    for mask in cases[:2]:
        assert rle_encode(mask) == reference_encode(mask)
    assert encoder._scratch.flags is None


def test_encode_from_many_threads() -> None:
    # Each thread has its own scratch buffer; interleaved calls must not mix results.
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(2)
    cases = []
    for i in range(8):
        mask = np.zeros(ORIG_SHAPE, dtype=np.uint8 if i % 2 else bool)
        top, left = rng.integers(100, 500), rng.integers(100, 800)
        mask[top : top + rng.integers(200, 700), left : left + rng.integers(300, 1000)] = 1
        mask[rng.integers(0, 1280), : rng.integers(1, 1918)] = 1
        cases.append(mask)
    expected = [reference_encode(mask) for mask in cases]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            assert list(pool.map(rle_encode, cases * 4)) == expected * 4


@settings(max_examples=200, deadline=None)
@given(masks())
def test_decode_matches_loop_decoder(mask: np.ndarray) -> None:
    rle = reference_encode(mask)
    np.testing.assert_array_equal(rle_decode(rle, mask.shape), reference_decode(rle, mask.shape))
    runs = rle_to_runs(rle, mask.size)
    assert runs.shape[1] == 2 and int(runs[:, 1].sum()) == int(mask.sum())


@pytest.mark.parametrize(
    ("rle", "kind", "message"),
    [
        ("1 2 3", "odd_count", "odd number"),
        ("1 2 x 3", "malformed", "'x'"),
        ("1 2.5", "malformed", "'2.5'"),
        ("-1 2", "malformed", "'-1'"),
        ("1 2,3 4", "malformed", "'2,3'"),
        ("0 3", "nonpositive", "start < 1"),
        ("4 0", "nonpositive", "length < 1"),
        ("19 3", "out_of_bounds", "past pixel 20"),
        ("21 1", "out_of_bounds", "past pixel 20"),
        ("1 99999999999999999999999", "out_of_bounds", "past pixel 20"),
        ("5 2 1 2", "order", "does not come after"),
        ("1 5 3 2", "order", "overlaps"),
    ],
)
def test_decode_errors(rle: str, kind: str, message: str) -> None:
    with pytest.raises(RLEError, match=message) as info:
        rle_decode(rle, (4, 5))
    assert info.value.kind == kind
    assert isinstance(info.value, ValueError)


def test_touching_runs_are_decoded_but_not_canonical() -> None:
    np.testing.assert_array_equal(rle_decode("1 2 3 2", (1, 5)), [[1, 1, 1, 1, 0]])
    with pytest.raises(RLEError, match="touches") as info:
        rle_to_runs("1 2 3 2", 5)
    assert info.value.kind == "touching"


def test_rle_to_runs_basics() -> None:
    assert rle_to_runs("").shape == (0, 2)
    assert rle_to_runs("  3 4  9 1 ").tolist() == [[3, 4], [9, 1]]
    with pytest.raises(RLEError, match="must be a string"):
        rle_to_runs(float("nan"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        rle_decode("1 1", (4,))  # type: ignore[arg-type]


def _official_rows() -> list[tuple[str, str]]:
    csv_path = SAMPLE / "train_masks.csv"
    if not csv_path.is_file() or not (SAMPLE / "train_masks").is_dir():
        pytest.skip(f"real data not found at {SAMPLE} (train_masks.csv + train_masks/)")
    with csv_path.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["img", "rle_mask"]
    return [(name, rle) for name, rle in rows[1:]]


def test_every_sample_mask_matches_official_csv() -> None:
    from PIL import Image

    rows = _official_rows()
    masks_dir = SAMPLE / "train_masks"
    gif_names = {p.name for p in masks_dir.glob("*_mask.gif")}
    assert gif_names, f"no GIF masks in {masks_dir}"
    by_gif = {Path(name).stem + "_mask.gif": rle for name, rle in rows}
    assert gif_names <= by_gif.keys(), "some GIFs have no row in train_masks.csv"
    for gif in sorted(gif_names):
        with Image.open(masks_dir / gif) as im:
            mask = np.array(im)
        assert mask.shape == ORIG_SHAPE, gif
        expected = by_gif[gif]
        assert rle_encode(mask) == expected, gif
        np.testing.assert_array_equal(rle_decode(expected), mask != 0, err_msg=gif)
