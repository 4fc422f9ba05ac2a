"""Rows made on a thread pool, collected in order and written chunk by chunk by one writer thread.

The prediction saver (carvana.submission.predictions) hands each image's post-processing
(upsample, threshold, RLE-encode: cv2 and numpy release the GIL, so this overlaps with the
model's next forward pass) to :class:`ChunkPipeline`. Memory stays bounded whatever the
number of images: at most ``max_pending`` jobs are in flight (past that, the caller blocks on
the oldest), one chunk of rows is being assembled, and one chunk write is in flight.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class ChunkPipeline:
    """Row jobs on ``workers`` threads; their rows, in submission order, written in chunks.

    Each job returns (row text, seconds it took). Every ``chunk_size`` rows (the last chunk:
    what is left of ``n_rows``) go to ``write_chunk(index, rows)`` on one writer thread, which
    keeps the chunks in order and off the caller's thread; it returns the number of rows
    written. Chunk indices start at ``first_chunk`` (the chunks already on disk when resuming).

    Counters: ``rows_written`` (rows of completed chunk writes), ``seconds`` (what the jobs
    reported, summed over workers).
    """

    def __init__(self, write_chunk: Callable[[int, list[str]], int], n_rows: int, chunk_size: int,
                 first_chunk: int, workers: int, max_pending: int) -> None:
        self._write_chunk = write_chunk
        self.n_rows = n_rows
        self.chunk_size = chunk_size
        self.workers = workers
        self.max_pending = max_pending
        self.rows_written = 0
        self.seconds = 0.0
        self._pending: deque[Future[tuple[str, float]]] = deque()
        self._rows: list[str] = []  # collected rows of the chunk being assembled
        self._chunks_queued = first_chunk  # chunks handed to the writer
        self._write: Future[int] | None = None  # the one chunk write that may be in flight
        self._pool: ThreadPoolExecutor | None = None
        self._writer: ThreadPoolExecutor | None = None

    def submit(self, job: Callable[..., tuple[str, float]], *args: Any) -> None:
        """Queue one row job (started on the first call: the pools are made then)."""
        self._pending.append(self._ensure_pools().submit(job, *args))

    def collect(self) -> None:
        """Collect whatever finished (in order), then block on the oldest while over ``max_pending``."""
        while self._pending and (self._pending[0].done() or len(self._pending) > self.max_pending):
            self._collect_oldest()

    def drain(self) -> None:
        """Collect every queued job and wait for the last chunk write."""
        while self._pending:
            self._collect_oldest()
        self.wait_write()

    def cancel(self) -> None:
        """Drop the queued jobs and the rows of the chunk being assembled: no partial chunk is written."""
        for fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self._rows.clear()

    def wait_write(self) -> None:
        """Wait for the chunk write in flight, if any (its error, e.g. a full disk, is raised here)."""
        if self._write is not None:
            write, self._write = self._write, None
            self.rows_written += write.result()

    def shutdown(self) -> None:
        """Stop both pools, cancelling what has not started."""
        for ex in (self._pool, self._writer):
            if ex is not None:
                ex.shutdown(wait=True, cancel_futures=True)

    def _ensure_pools(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="rle")
            # One writer thread keeps chunks in order and off the main thread.
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="submit-writer")
        return self._pool

    def _collect_oldest(self) -> None:
        row, seconds = self._pending.popleft().result()
        self.seconds += seconds
        self._rows.append(row)
        start = self._chunks_queued * self.chunk_size
        if len(self._rows) == min(self.chunk_size, self.n_rows - start):
            rows, self._rows = self._rows, []
            self.wait_write()  # at most one chunk in flight keeps memory flat
            assert self._writer is not None
            self._write = self._writer.submit(self._write_chunk, self._chunks_queued, rows)
            self._chunks_queued += 1
