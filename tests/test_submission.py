"""Tests for carvana.submission: the validator's defect classes, local scoring, the CLI."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carvana.data.rle import rle_decode, rle_encode, rle_to_runs
from carvana.submission.validate import (
    PROBLEM_KINDS,
    SubmissionError,
    car_scores,
    dice_from_runs,
    expected_names,
    image_scores,
    main,
    read_submission,
    score_submission,
    validate_submission,
)

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "carvana-sample"
SHAPE = (6, 10)  # small masks keep hand-written RLEs readable; 60 pixels
NAMES = [f"car{i}_01.jpg" for i in range(4)]
GOOD = {NAMES[0]: "1 3 10 2", NAMES[1]: "", NAMES[2]: "60 1", NAMES[3]: "5 5 20 40"}


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "img,rle_mask") -> Path:
    """Write rows as a submission; gzip when the name ends with .gz."""
    text = "".join(f"{line}\n" for line in [header, *(f"{n},{r}" for n, r in rows)])
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def good_rows() -> list[tuple[str, str]]:
    return list(GOOD.items())


@pytest.mark.parametrize("name", ["sub.csv", "sub.csv.gz"])
def test_good_file_passes(tmp_path: Path, name: str) -> None:
    report = validate_submission(write_csv(tmp_path / name, good_rows()), NAMES, SHAPE)
    assert report.ok and report.n_rows == 4 and report.n_expected == 4
    assert report.counts == {} and "OK" in str(report)


def _with(rows: list[tuple[str, str]], **changes: str) -> list[tuple[str, str]]:
    return [(n, changes.get(n.split("_")[0], r)) for n, r in rows]


DEFECTS = {
    # kind: (rows, header, text expected in the report)
    "missing": (good_rows()[:3], None, NAMES[3]),
    "duplicate": (good_rows() + [(NAMES[1], "")], None, NAMES[1]),
    "unexpected": (good_rows() + [("stranger_01.jpg", "1 1")], None, "stranger_01.jpg"),
    "bad_row": (good_rows() + [("x_01.jpg,1 1", "2 2")], None, "3 fields"),
    "odd_count": (_with(good_rows(), car0="1 3 10"), None, "odd number"),
    "malformed": (_with(good_rows(), car0="1 3 x 2"), None, "'x'"),
    "nonpositive": (_with(good_rows(), car0="0 3"), None, "start < 1"),
    "out_of_bounds": (_with(good_rows(), car2="58 4"), None, "past pixel 60"),
    "order": (_with(good_rows(), car0="10 2 1 3"), None, "does not come after"),
    "touching": (_with(good_rows(), car0="1 3 4 2"), None, "touches"),
    "header": (good_rows(), "image,rle", "'image,rle'"),
}


@pytest.mark.parametrize("kind", sorted(DEFECTS))
def test_each_defect_is_reported_alone(tmp_path: Path, kind: str) -> None:
    rows, header, needle = DEFECTS[kind]
    path = write_csv(tmp_path / "sub.csv", rows, header or "img,rle_mask")
    report = validate_submission(path, NAMES, SHAPE)
    assert not report.ok
    assert report.counts == {kind: 1}, str(report)
    text = str(report)
    assert "INVALID" in text and kind in text and needle in text and str(path) in text


def test_overlapping_runs_are_order_problems(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "sub.csv", _with(good_rows(), car3="5 10 8 2"))
    report = validate_submission(path, NAMES, SHAPE)
    assert report.counts == {"order": 1} and "overlaps" in str(report)


def test_missing_header_still_checks_the_first_row(tmp_path: Path) -> None:
    path = tmp_path / "sub.csv"
    path.write_text("".join(f"{n},{r}\n" for n, r in good_rows()))
    report = validate_submission(path, NAMES, SHAPE)
    assert report.counts == {"header": 1} and report.n_rows == 4


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "not_gzip", "empty"])
def test_unreadable_files(tmp_path: Path, damage: str) -> None:
    path = write_csv(tmp_path / "sub.csv.gz", good_rows() * 50)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "corrupt":
        path.write_bytes(data[:20] + bytes(b ^ 0xFF for b in data[20:60]) + data[60:])
    elif damage == "not_gzip":
        path.write_bytes(b"img,rle_mask\n")
    else:
        path = tmp_path / "empty.csv"
        path.write_bytes(b"")
    report = validate_submission(path, NAMES, SHAPE)
    kind = "header" if damage == "empty" else "unreadable"
    assert not report.ok and kind in report.counts, str(report)
    assert str(path) in str(report)
    if damage != "empty":
        with pytest.raises(SubmissionError, match=str(path.name)):
            read_submission(path)


def test_report_lists_first_examples_and_total(tmp_path: Path) -> None:
    names = [f"c{i}_01.jpg" for i in range(12)]
    path = write_csv(tmp_path / "sub.csv", [])
    report = validate_submission(path, names, SHAPE, max_examples=5)
    assert report.counts == {"missing": 12} and len(report.examples["missing"]) == 5
    text = str(report)
    assert "missing (12)" in text and "... and 7 more" in text and "c4_01.jpg" in text
    assert "c5_01.jpg" not in text
    assert set(PROBLEM_KINDS) >= set(DEFECTS)


def test_read_submission_and_expected_names(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "s.csv.gz", good_rows())
    assert read_submission(path) == GOOD
    assert expected_names(path) == NAMES
    with pytest.raises(SubmissionError, match="header"):
        read_submission(write_csv(tmp_path / "h.csv", good_rows(), header="img,mask"))
    with pytest.raises(SubmissionError, match="duplicate"):
        read_submission(write_csv(tmp_path / "d.csv", good_rows() + good_rows()[:1]))
    with pytest.raises(SubmissionError, match="no image rows"):
        expected_names(write_csv(tmp_path / "e.csv", []))
    with pytest.raises(SubmissionError, match="cannot open"):
        read_submission(tmp_path / "absent.csv")


def numpy_dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


@st.composite
def mask_pairs(draw) -> tuple[np.ndarray, np.ndarray]:
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 20))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return tuple(rng.random((h, w)) < draw(st.floats(0, 1)) for _ in range(2))  # type: ignore[return-value]


@settings(max_examples=300, deadline=None)
@given(mask_pairs())
def test_dice_from_runs_matches_numpy(pair: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = pair
    runs_a, runs_b = rle_to_runs(rle_encode(a)), rle_to_runs(rle_encode(b))
    assert dice_from_runs(runs_a, runs_b) == pytest.approx(numpy_dice(a, b), abs=1e-12)


def test_score_matches_numpy_on_random_masks(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    names = [f"r{i}_01.jpg" for i in range(20)]
    truth = {n: rng.random(SHAPE) < rng.random() for n in names}
    pred = {n: (m ^ (rng.random(SHAPE) < 0.2)) for n, m in truth.items()}
    sol = write_csv(tmp_path / "sol.csv", [(n, rle_encode(m)) for n, m in truth.items()])
    # extra rows for other images are ignored; order does not matter
    sub_rows = [(n, rle_encode(pred[n])) for n in reversed(names)] + [("other_01.jpg", "1 1")]
    sub = write_csv(tmp_path / "sub.csv.gz", sub_rows)
    expected = np.mean([numpy_dice(pred[n], truth[n]) for n in names])
    assert score_submission(sub, sol, SHAPE) == pytest.approx(expected, abs=1e-12)
    assert score_submission(sol, sol, SHAPE) == 1.0


@pytest.mark.parametrize(
    ("truth", "pred", "dice"), [("", "", 1.0), ("", "5 3", 0.0), ("5 3", "", 0.0), ("5 3", "5 1", 0.5)]
)
def test_score_empty_masks(tmp_path: Path, truth: str, pred: str, dice: float) -> None:
    sol = write_csv(tmp_path / "sol.csv", [(NAMES[0], truth)])
    sub = write_csv(tmp_path / "sub.csv", [(NAMES[0], pred)])
    assert score_submission(sub, sol, SHAPE) == dice


def test_image_and_car_scores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Per-image scores in solution order, their per-car means, and the mean of them all."""
    rng = np.random.default_rng(5)
    names = [f"{car}_{view:02d}.jpg" for car in ("bbb", "aaa") for view in (1, 2, 3)]
    truth = {n: rng.random(SHAPE) < 0.5 for n in names}
    pred = {n: m ^ (rng.random(SHAPE) < 0.1 * (i + 1)) for i, (n, m) in enumerate(truth.items())}
    sol = write_csv(tmp_path / "sol.csv", [(n, rle_encode(m)) for n, m in truth.items()])
    sub = write_csv(tmp_path / "sub.csv", [(n, rle_encode(pred[n])) for n in reversed(names)])
    scores = image_scores(sub, sol, SHAPE)
    assert list(scores) == names
    for name in names:
        assert scores[name] == pytest.approx(numpy_dice(pred[name], truth[name]), abs=1e-12)
    cars = car_scores(scores)
    assert list(cars) == ["aaa", "bbb"]
    assert cars["bbb"] == pytest.approx(np.mean([scores[n] for n in names[:3]]), abs=1e-12)
    assert score_submission(sub, sol, SHAPE) == pytest.approx(np.mean(list(scores.values())), abs=1e-12)
    # the CLI at the competition shape: each car's line, then the mean
    good = write_csv(tmp_path / "good.csv", good_rows())
    assert main(["score", str(good), "--solution", str(good), "--per-car"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"car{i}: 1.000000" for i in range(4)] + ["mean Dice: 1.000000"]
    odd = write_csv(tmp_path / "odd.csv", [("nocar.jpg", "1 1")])
    assert main(["score", str(odd), "--solution", str(odd), "--per-car"]) == 1
    assert "odd.csv: nocar.jpg: not a Carvana image name" in capsys.readouterr().err


def test_score_errors(tmp_path: Path) -> None:
    sol = write_csv(tmp_path / "sol.csv", good_rows())
    with pytest.raises(SubmissionError, match=r"1 of the solution's 4 images have no row.*car3_01"):
        score_submission(write_csv(tmp_path / "a.csv", good_rows()[:3]), sol, SHAPE)
    with pytest.raises(SubmissionError, match=r"line 2, car0_01.jpg: odd number"):
        score_submission(write_csv(tmp_path / "b.csv", _with(good_rows(), car0="1")), sol, SHAPE)
    with pytest.raises(SubmissionError, match="duplicate"):
        score_submission(write_csv(tmp_path / "c.csv", good_rows() + good_rows()[:1]), sol, SHAPE)


def _real(name: str) -> Path:
    path = SAMPLE / name
    if not path.is_file():
        pytest.skip(f"real data not found: {path}")
    return path


def test_real_solution_scores() -> None:
    solution, sample = _real("test_solution.csv"), _real("sample_submission.csv")
    assert score_submission(solution, solution) == 1.0
    truth, sub = read_submission(solution), read_submission(sample)
    expected = np.mean([numpy_dice(rle_decode(sub[n]), rle_decode(r)) for n, r in truth.items()])
    got = score_submission(sample, solution)
    assert got == pytest.approx(expected, abs=1e-12) and got < 0.01
    assert validate_submission(solution, expected_names(sample)).ok


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = write_csv(tmp_path / "sample.csv", [(n, "1 1") for n in NAMES])
    # the CLI works at the competition shape, where these small RLEs are still valid
    good = write_csv(tmp_path / "good.csv", good_rows())
    bad = write_csv(tmp_path / "bad.csv", good_rows()[:3])
    assert main(["validate", str(good), "--sample-submission", str(names)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["validate", str(bad), "--sample-submission", str(names)]) == 1
    assert "missing (1)" in capsys.readouterr().out
    assert main(["score", str(good), "--solution", str(good)]) == 0
    assert capsys.readouterr().out.strip() == "mean Dice: 1.000000"
    assert main(["score", str(bad), "--solution", str(good)]) == 1
    assert "no row" in capsys.readouterr().err
    missing = str(tmp_path / "missing.csv")
    for argv in (["validate", str(good), "--sample-submission", missing], ["score", str(good), "--solution", missing]):
        assert main(argv) == 1  # one line, whichever subcommand met the error
        assert capsys.readouterr().err == f"error: {missing}: cannot open: No such file or directory\n"
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(good)])  # --sample-submission is required
    assert exc.value.code == 2


def test_cli_runs_as_module(tmp_path: Path) -> None:
    sample = write_csv(tmp_path / "sample.csv", [(n, "1 1") for n in NAMES])
    bad = write_csv(tmp_path / "bad.csv", good_rows() + [(NAMES[0], "")])
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "carvana.submission", "validate", str(bad)]
    cmd += ["--sample-submission", str(sample)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "duplicate (1)" in done.stdout
