"""Progress lines for long predictions off a terminal (nohup, CI, a notebook's log).

tqdm draws no bar when stderr is not a terminal, so 100,064 test images would otherwise go by
with many minutes of silence. :class:`ProgressLine` prints, on rank 0 only, a line such as::

    prediction: 1,200/100,064 images (1.2%), 35.2 images/s, about 47 min left

at most once per ``interval_s`` seconds, and a last one when the prediction ends.
"""

from __future__ import annotations

import sys
import time

from carvana.training import distributed as dist

DEFAULT_INTERVAL_S = 60.0


def stderr_is_terminal() -> bool:
    """Where tqdm would draw its bar; False for a closed or replaced stream without a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def format_duration(seconds: float) -> str:
    """'12 s', '4 min 10 s', '1 h 05 min'."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class ProgressLine:
    """Counts predicted images and prints a progress line now and then (see the module docstring).

    ``enabled``: None prints only off a terminal and on rank 0 (a bar shows progress on a
    terminal); ``interval_s`` 0 prints after every :meth:`advance`.
    """

    def __init__(self, total: int, what: str = "prediction", interval_s: float = DEFAULT_INTERVAL_S,
                 enabled: bool | None = None) -> None:
        self.total, self.what, self.interval_s = total, what, interval_s
        self.enabled = (not stderr_is_terminal() and dist.is_main_process()) if enabled is None else enabled
        self.done = 0
        self.start = self.last = time.monotonic()
        self._finished = False

    def restart(self) -> None:
        """Start the clock now (the first batch, rather than when the writer was built)."""
        if self.done == 0:
            self.start = self.last = time.monotonic()

    def advance(self, images: int) -> None:
        """``images`` more are predicted; print if the last line is ``interval_s`` old."""
        self.done += images
        now = time.monotonic()
        if self.enabled and self.done < self.total and now - self.last >= self.interval_s:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            left = format_duration((self.total - self.done) / rate) if rate > 0 else "?"
            self._print(f"{self.done:,}/{self.total:,} images ({100 * self.done / self.total:.1f}%), "
                        f"{rate:.1f} images/s, about {left} left")

    def finish(self) -> None:
        """The last line (once), when there was something to predict."""
        if self.enabled and not self._finished and self.total > 0:
            self._finished = True
            elapsed = time.monotonic() - self.start
            self._print(f"{self.done:,}/{self.total:,} images in {format_duration(elapsed)} "
                        f"({self.done / max(elapsed, 1e-9):.1f} images/s)")

    def _print(self, text: str) -> None:
        print(f"{self.what}: {text}", flush=True)  # flushed: stdout to a file is block-buffered
