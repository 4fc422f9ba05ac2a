"""Scoring a submission locally: the competition's mean Dice against a solution CSV.

Works on run arrays (never full 1918x1280 masks): the Dice of two masks comes from their
runs alone (:func:`dice_from_runs`), so a full submission scores in seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from carvana.data.layout import ORIG_SHAPE, car_id
from carvana.data.rle import RLEError, rle_to_runs
from carvana.submission.reading import HEADER_LINE, SubmissionError, iter_lines, read_submission, split_row


def dice_from_runs(a: np.ndarray, b: np.ndarray) -> float:
    """Dice 2|A∩B| / (|A|+|B|) of two masks given as sorted, disjoint runs; 1.0 if both are empty.

    |A∩B| = |A| + |B| - |A∪B|, and the union of the merged, start-sorted runs is
    measured with a running maximum of run ends: O(k log k), no mask decoded.
    """
    size_a, size_b = int(a[:, 1].sum()), int(b[:, 1].sum())
    if size_a + size_b == 0:
        return 1.0
    if size_a == 0 or size_b == 0:
        return 0.0
    both = np.concatenate([a, b])
    both = both[np.argsort(both[:, 0], kind="stable")]
    starts, ends = both[:, 0], both[:, 0] + both[:, 1]  # [start, end), 1-indexed
    covered = np.maximum.accumulate(ends)  # furthest end among the runs so far
    fresh = np.maximum(ends[1:] - np.maximum(starts[1:], covered[:-1]), 0)  # newly covered pixels
    union = int(ends[0] - starts[0]) + int(fresh.sum())
    return 2.0 * (size_a + size_b - union) / (size_a + size_b)


def score_submission(
    submission_path: str | Path, solution_path: str | Path, shape: tuple[int, int] = ORIG_SHAPE
) -> float:
    """Mean Dice of the submission over the solution's images (the competition metric).

    Rows of the submission for images not in the solution are ignored, so a
    full submission can be scored on a labelled subset.  A solution image with
    no row, a duplicate row, or a malformed RLE raises ``SubmissionError``.
    """
    return mean_dice(image_scores(submission_path, solution_path, shape))


def mean_dice(scores: dict[str, float]) -> float:
    """The competition's figure from per-image scores: their plain mean."""
    return float(np.mean(list(scores.values())))


def car_scores(scores: dict[str, float]) -> dict[str, float]:
    """Mean Dice per car (``<car>_<view>.jpg``) of per-image scores, cars in name order.

    A held-out set of a few cars is judged car by car: one hard car moves the mean by more
    than the difference between two settings, and this shows which car it was."""
    by_car: dict[str, list[float]] = {}
    for name, dice in scores.items():
        by_car.setdefault(car_id(name), []).append(dice)
    return {car: float(np.mean(by_car[car])) for car in sorted(by_car)}


def image_scores(
    submission_path: str | Path, solution_path: str | Path, shape: tuple[int, int] = ORIG_SHAPE
) -> dict[str, float]:
    """Dice of each of the solution's images (solution order); the errors of :func:`score_submission`."""
    n_pixels = shape[0] * shape[1]
    truth = {}
    for name, rle in read_submission(solution_path).items():
        try:
            truth[name] = rle_to_runs(rle, n_pixels, strict=False)
        except RLEError as exc:
            raise SubmissionError(f"{solution_path}: {name}: {exc}") from exc
    if not truth:
        raise SubmissionError(f"{solution_path}: no images to score")
    scores: dict[str, float] = {}
    for line_no, line in iter_lines(submission_path):
        if line_no == 1:
            if line != HEADER_LINE:
                raise SubmissionError(f"{submission_path}: header is {line[:60]!r}, expected {HEADER_LINE!r}")
            continue
        fields = split_row(line)
        if len(fields) != 2 or fields[0] not in truth:
            continue
        name, rle = fields
        if name in scores:
            raise SubmissionError(f"{submission_path}: line {line_no}: duplicate row for {name}")
        try:
            runs = rle_to_runs(rle, n_pixels, strict=False)
        except RLEError as exc:
            raise SubmissionError(f"{submission_path}: line {line_no}, {name}: {exc}") from exc
        scores[name] = dice_from_runs(runs, truth[name])
    missing = [name for name in truth if name not in scores]
    if missing:
        raise SubmissionError(
            f"{submission_path}: {len(missing)} of the solution's {len(truth)} images have no row "
            f"(first: {', '.join(missing[:5])})"
        )
    return {name: scores[name] for name in truth}
