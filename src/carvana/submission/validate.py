"""Kaggle submission files: read, validate and score ``img,rle_mask`` CSVs.

This module validates a submission, gates the upload on that, and is the command line for
all three; reading the CSVs is carvana.submission.reading, local scoring
carvana.submission.scoring. Validation streams the file row by row and works on run arrays
(never full 1918x1280 masks), so the full 100,064-row, ~1 GB competition file validates in
seconds.

CLI::

    python -m carvana.submission validate FILE --sample-submission CSV   # exit 1 if invalid
    python -m carvana.submission score FILE --solution CSV [--per-car]   # prints the mean Dice
    python -m carvana.submission upload FILE --sample-submission CSV -m MESSAGE
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carvana.data.layout import ORIG_SHAPE
from carvana.data.rle import RLEError, rle_to_runs
# Reading and scoring were in this module once; their names are imported from here too.
from carvana.submission.reading import (HEADER_LINE, SubmissionError, expected_names, iter_lines,  # noqa: F401
                                        read_submission, split_row)
from carvana.submission.scoring import car_scores, dice_from_runs, image_scores, mean_dice, score_submission  # noqa: F401

# Problem kinds, in report order, with what each means.
PROBLEM_KINDS = {
    "unreadable": "file could not be read (checks stopped there)",
    "header": f"first line is not exactly {HEADER_LINE!r}",
    "bad_row": "row without exactly two fields",
    "missing": "expected image with no row",
    "unexpected": "row for an image that is not expected",
    "duplicate": "second or later row for the same image",
    "malformed": "RLE token that is not a non-negative integer",
    "odd_count": "RLE with an odd number of values",
    "nonpositive": "RLE start or length < 1",
    "out_of_bounds": "RLE run past the last pixel",
    "order": "RLE starts not increasing / runs overlapping",
    "touching": "RLE run touching the previous one (not merged)",
}


@dataclass
class SubmissionReport:
    """Outcome of ``validate_submission``: problems grouped by kind (see PROBLEM_KINDS)."""

    path: str
    ok: bool
    n_rows: int
    n_expected: int
    counts: dict[str, int] = field(default_factory=dict)  # kind -> number of problems
    examples: dict[str, list[str]] = field(default_factory=dict)  # kind -> the first few

    def __str__(self) -> str:
        if self.ok:
            return (f"{self.path}: OK - {self.n_rows:,} rows, all {self.n_expected:,} expected "
                    "images present once, every RLE well formed")
        total = sum(self.counts.values())
        lines = [f"{self.path}: INVALID - {total:,} problem(s) of {len(self.counts)} kind(s) "
                 f"in {self.n_rows:,} rows ({self.n_expected:,} images expected)"]
        for kind in PROBLEM_KINDS:
            if kind not in self.counts:
                continue
            lines.append(f"  {kind} ({self.counts[kind]:,}): {PROBLEM_KINDS[kind]}")
            lines += [f"    - {example}" for example in self.examples[kind]]
            if self.counts[kind] > len(self.examples[kind]):
                lines.append(f"    ... and {self.counts[kind] - len(self.examples[kind]):,} more")
        return "\n".join(lines)


def validate_submission(
    path: str | Path,
    expected: Sequence[str],
    shape: tuple[int, int] = ORIG_SHAPE,
    max_examples: int = 5,
) -> SubmissionReport:
    """Check a submission file without decoding masks; never raises for a bad file.

    Checks: readable (gzip / UTF-8), header exactly ``img,rle_mask``, exactly one
    row per expected image (missing, unexpected, duplicate rows), and every RLE
    well formed and canonical within ``shape`` (see ``carvana.data.rle.rle_to_runs``).
    """
    n_pixels = shape[0] * shape[1]
    expected_set = set(expected)
    counts: dict[str, int] = {}
    examples: dict[str, list[str]] = {}

    def problem(kind: str, message: str) -> None:
        counts[kind] = counts.get(kind, 0) + 1
        shown = examples.setdefault(kind, [])
        if len(shown) < max_examples:
            shown.append(message)

    seen: set[str] = set()
    n_rows = 0
    line_no = 0
    try:
        for line_no, line in iter_lines(path):
            if line_no == 1 and line != HEADER_LINE:
                problem("header", f"line 1 is {line[:60]!r}, expected {HEADER_LINE!r}")
                if not line.split(",")[0].endswith(".jpg"):
                    continue  # a wrong header; otherwise a missing one, and this is a row
            elif line_no == 1 or not line:
                continue
            n_rows += 1
            fields = split_row(line)
            if len(fields) != 2:
                problem("bad_row", f"line {line_no}: {len(fields)} fields: {line[:60]!r}")
                continue
            name, rle = fields
            if name in seen:
                problem("duplicate", f"line {line_no}: {name}")
            elif name not in expected_set:
                problem("unexpected", f"line {line_no}: {name[:60]!r}")
            seen.add(name)
            try:
                rle_to_runs(rle, n_pixels, strict=True)
            except RLEError as exc:
                problem(exc.kind, f"line {line_no}, {name[:60]}: {exc}")
    except SubmissionError as exc:
        problem("unreadable", str(exc))
    else:
        if line_no == 0:
            problem("header", f"empty file, expected the header {HEADER_LINE!r}")
        for name in expected:
            if name not in seen:
                problem("missing", name)
    return SubmissionReport(str(path), not counts, n_rows, len(expected_set), counts, examples)


def upload_submission(path: str | Path, expected: Sequence[str], message: str, api: Any = None) -> Any:
    """Validate ``path`` against ``expected`` and upload it to Kaggle only if it passes.

    Raises SubmissionError (with the full report) for an invalid file: nothing is sent.
    Kaggle's own errors (no credentials, 401, 403 rules not accepted) come from
    carvana.data.sources.kaggle_client with what to do about them.
    """
    from carvana.data.sources.kaggle_client import submit  # imported late: validation needs no kaggle package

    report = validate_submission(path, expected)
    if not report.ok:
        raise SubmissionError(f"not uploading {path}: it is not a valid submission\n{report}")
    return submit(path, message, api=api)


def per_car(scores: dict[str, float], solution: Path) -> dict[str, float]:
    """:func:`car_scores`, with a solution row that is not a Carvana image name as a SubmissionError."""
    try:
        return car_scores(scores)
    except ValueError as exc:
        raise SubmissionError(f"{solution}: {exc}") from exc


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 invalid / error)."""
    parser = argparse.ArgumentParser(prog="python -m carvana.submission",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_val = sub.add_parser("validate", help="check a submission file; exit 1 with a report if invalid")
    p_val.add_argument("file", type=Path)
    p_val.add_argument("--sample-submission", type=Path, required=True, help="CSV naming the expected images")
    p_val.add_argument("--max-examples", type=int, default=5, help="problems listed per kind (default 5)")
    p_score = sub.add_parser("score", help="mean Dice against a solution CSV")
    p_score.add_argument("file", type=Path)
    p_score.add_argument("--solution", type=Path, required=True, help="CSV with the true masks as RLE")
    p_score.add_argument("--per-car", action="store_true", help="also print each car's mean Dice")
    p_up = sub.add_parser("upload", help="validate, then upload to Kaggle (needs credentials)")
    p_up.add_argument("file", type=Path)
    p_up.add_argument("--sample-submission", type=Path, required=True, help="CSV naming the expected images")
    p_up.add_argument("-m", "--message", required=True, help="Kaggle submission message")
    args = parser.parse_args(argv)
    try:
        if args.command == "upload":
            response = upload_submission(args.file, expected_names(args.sample_submission), args.message)
            print(f"uploaded {args.file}: {getattr(response, 'message', response)}")
            return 0
        if args.command == "validate":
            report = validate_submission(args.file, expected_names(args.sample_submission),
                                         max_examples=args.max_examples)
            print(report)
            return 0 if report.ok else 1
        scores = image_scores(args.file, args.solution)
        if args.per_car:
            for car, dice in per_car(scores, args.solution).items():
                print(f"{car}: {dice:.6f}")
        print(f"mean Dice: {mean_dice(scores):.6f}")
        return 0
    except (SubmissionError, RuntimeError) as exc:  # RuntimeError: KaggleError and subclasses
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
