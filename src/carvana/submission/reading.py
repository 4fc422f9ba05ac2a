"""Reading ``img,rle_mask`` CSVs (submissions, sample submissions, solutions), row by row.

A submission is a CSV (plain, or gzip when it starts with the gzip magic bytes;
a ``.gz`` name must be gzip) with the header ``img,rle_mask`` and one
``<image name>,<RLE>`` row per test image. The file is streamed line by line, so
the full 100,064-row, ~1 GB competition file is never held as text. A file that
cannot be used is a :class:`SubmissionError` naming it.
"""

from __future__ import annotations

import csv
import gzip
import io
import zlib
from collections.abc import Iterator
from pathlib import Path

from carvana.data.layout import SUBMISSION_HEADER

HEADER_LINE = ",".join(SUBMISSION_HEADER)


class SubmissionError(ValueError):
    """A submission or solution file that cannot be used; the message names the file."""


def _open_text(path: Path) -> io.TextIOWrapper:
    """Open a CSV as text, transparently gunzipping it."""
    try:
        raw = path.open("rb")
    except OSError as exc:
        raise SubmissionError(f"{path}: cannot open: {exc.strerror or exc}") from exc
    magic = raw.read(2)
    raw.seek(0)
    if magic == b"\x1f\x8b":
        raw.close()
        stream = gzip.open(path, "rb")  # owns (and closes) its file, unlike GzipFile(fileobj=)
    elif path.suffix == ".gz":
        raw.close()
        raise SubmissionError(f"{path}: named .gz but is not a gzip file (starts with {magic!r})")
    else:
        stream = raw
    # utf-8-sig: a BOM written by some editors is not part of the header
    return io.TextIOWrapper(stream, encoding="utf-8-sig", newline=None)


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield (line number, line without its newline); read errors -> SubmissionError."""
    path = Path(path)
    line_no = 0
    with _open_text(path) as text:
        try:
            for line_no, line in enumerate(text, 1):
                yield line_no, line.rstrip("\n")
        except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
            what = "gzip data" if isinstance(exc, (OSError, EOFError, zlib.error)) else "text"
            raise SubmissionError(f"{path}: unreadable {what} after line {line_no}: {exc}") from exc


def split_row(line: str) -> list[str]:
    """'name,rle' -> [name, rle]; quoted fields (rare) go through the csv module."""
    if '"' in line:
        return next(csv.reader([line]), [])
    return line.split(",")


def read_submission(path: str | Path) -> dict[str, str]:
    """Read a whole submission (or solution) as {image name: RLE string}, in file order.

    Checks the header and the row shape and rejects duplicate names; the RLE
    strings themselves are returned unchecked (see ``validate_submission``).
    """
    rows: dict[str, str] = {}
    header_seen = False
    for line_no, line in iter_lines(path):
        if line_no == 1:
            if line != HEADER_LINE:
                raise SubmissionError(f"{path}: header is {line[:60]!r}, expected {HEADER_LINE!r}")
            header_seen = True
            continue
        if not line:
            continue
        fields = split_row(line)
        if len(fields) != 2:
            raise SubmissionError(f"{path}: line {line_no}: expected 2 fields, got {len(fields)}")
        if fields[0] in rows:
            raise SubmissionError(f"{path}: line {line_no}: duplicate row for {fields[0]!r}")
        rows[fields[0]] = fields[1]
    if not header_seen:
        raise SubmissionError(f"{path}: empty file, expected the header {HEADER_LINE!r}")
    return rows


def expected_names(sample_submission_csv: str | Path) -> list[str]:
    """The image names of a sample submission, in file order (at least one)."""
    names = list(read_submission(sample_submission_csv))
    if not names:
        raise SubmissionError(f"{sample_submission_csv}: no image rows after the header")
    return names
