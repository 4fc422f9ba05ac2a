"""PredictionsSaverCallback interrupted and resumed: kill -9, exceptions, torn writes, a full disk,
changed settings, finished files recognised by their fingerprint.

The callback is driven directly with synthetic probability maps (prediction_helpers), so no
model is needed. main.py end to end: test_predict_resume.py.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from carvana.submission.gzip_stream import GZIP_HEADER
from carvana.submission.predictions import PredictionsSaverCallback
from prediction_helpers import feed, make_names, partial, run_full, side

TESTS_DIR = Path(__file__).resolve().parent
SRC_DIR = TESTS_DIR.parent / "src"

CHILD = """
import os, signal, sys
from pathlib import Path
sys.path[:0] = [{src!r}, {tests!r}]
from prediction_helpers import feed, make_names
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
    assert "2/4 chunks saved" in (err := capsys.readouterr().err) and "resumes from chunk 3" in err
    assert not out.exists()
    assert json.loads(side(out).read_text())["chunks_done"] == cb.chunks_done == 2
    data = partial(out).read_bytes()  # the unfinished member: header + full-flushed segments, no trailer
    assert data.startswith(GZIP_HEADER)
    text = zlib.decompressobj(-15).decompress(data[len(GZIP_HEADER):]).decode()
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


def test_other_fingerprint_starts_fresh_and_says_which_setting_changed(tmp_path: Path, capsys) -> None:
    names = make_names(10)
    out = tmp_path / "submit.csv.gz"
    cases = [({"names": names[::-1]}, "names changed"), ({"chunk_size": 4}, "chunk_size changed (3 -> 4)"),
             ({"settings": {"tta": False}}, "tta changed (<none> -> false)"),
             ({"threshold": 0.3}, "threshold changed (0.5 -> 0.3)")]
    for other, message in cases:
        kw = {"names": names, "chunk_size": 3, "threshold": 0.5} | other
        side(out).unlink(missing_ok=True)
        _interrupt_after(out, names, fed=7, chunk_size=3, threshold=0.5)  # the 0.5 run's progress again
        capsys.readouterr()
        cb = PredictionsSaverCallback(out, **kw)
        assert cb.remaining() == kw["names"] and cb.chunks_done == 0
        assert partial(out).stat().st_size == len(GZIP_HEADER) and not side(out).exists()
        err = capsys.readouterr().err
        assert "not resuming" in err and message in err, err
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


def _threads(prefix: str) -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


@pytest.mark.parametrize("fail_at, saved, hint", [
    (4, "3/4 chunks", "resumes from chunk 4"),  # the last chunk, written while on_predict_end drains
    (5, "4/4 chunks", "finishes it without predicting again"),  # the trailer that ends the member
])
def test_disk_full_while_finishing_cleans_up_and_a_rerun_resumes(tmp_path: Path, monkeypatch, capsys,
                                                                 fail_at, saved, hint) -> None:
    # Fails on the old code: an error while draining skipped the cleanup (pools left running,
    # no message saying where the chunks are and that a rerun resumes).
    import errno

    names = make_names(10)
    reference = run_full(tmp_path / "ref.csv.gz", names, chunk_size=3)
    out = tmp_path / "out" / "submit.csv.gz"
    real_fsync, calls = os.fsync, []

    def fsync(fd: int) -> None:  # every write of the .partial ends with an fsync: fail the fail_at-th
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".partial"):
            calls.append(fd)
            if len(calls) == fail_at:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr("carvana.submission.gzip_stream.os.fsync", fsync)
    cb = PredictionsSaverCallback(out, names, chunk_size=3, workers=2, max_pending=64)
    feed(cb, names, batch=5)  # max_pending > 10: the last chunk is written in on_predict_end
    with pytest.raises(OSError) as info:
        cb.on_predict_end(None)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and str(partial(out)) in str(info.value)
    err = capsys.readouterr().err
    assert f"{saved} saved in {partial(out)}" in err and hint in err and "No space left" in err, err
    assert _threads("rle") == [] and _threads("submit-writer") == []  # the pools were shut down
    assert not out.exists()

    again = PredictionsSaverCallback(out, names, chunk_size=3)
    assert again.remaining() == names[3 * (fail_at - 1):]
    feed(again, again.remaining())
    again.on_predict_end(None)
    assert out.read_bytes() == reference


def test_a_finished_file_with_the_same_fingerprint_is_recognised_not_rewritten(tmp_path: Path, capsys) -> None:
    # Fails on the old code: nothing recorded what a finished file was made from, so every run predicted again.
    names = make_names(7)
    out = tmp_path / "submit.csv.gz"
    settings = {"weights": "sha256 aaa", "tta": True}
    data = run_full(out, names, chunk_size=3, settings=settings)
    record = json.loads(out.with_name(out.name + ".json").read_text())
    assert record["rows"] == 7 and record["bytes"] == len(data) and record["components"]["weights"] == "sha256 aaa"
    mtime = out.stat().st_mtime_ns

    cb = PredictionsSaverCallback(out, names, chunk_size=3, settings=settings)
    assert cb.already_complete and cb.remaining() == [] and cb.rows_resumed == 7
    cb.on_predict_end(None)
    assert out.stat().st_mtime_ns == mtime and not partial(out).exists()

    capsys.readouterr()
    cb = PredictionsSaverCallback(out, names, chunk_size=3, settings={**settings, "weights": "sha256 bbb"})
    assert not cb.already_complete and cb.remaining() == names
    assert "made with other settings: weights changed (sha256 aaa -> sha256 bbb)" in capsys.readouterr().err
    cb.on_exception(None, KeyboardInterrupt())

    out.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # edited since: the record no longer describes it
    cb = PredictionsSaverCallback(out, names, chunk_size=3, settings=settings)
    assert not cb.already_complete and "changed since it was written" in capsys.readouterr().err


def test_weights_digest_follows_the_contents_not_the_file(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from carvana.submission.fingerprint import weights_digest

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    torch.save(net.state_dict(), tmp_path / "a.pt")
    torch.save(net.state_dict(), tmp_path / "b.pt")  # another path and mtime, same weights
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert weights_digest(a) == weights_digest(b) == weights_digest(net.state_dict())
    b["0.weight"] = b["0.weight"].clone()
    b["0.weight"][0, 0, 0, 0] += 1e-6
    assert weights_digest(b) != weights_digest(a)
    assert weights_digest({"w": torch.ones(2, dtype=torch.bfloat16)}) != weights_digest({"w": torch.ones(2)})
