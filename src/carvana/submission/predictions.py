"""Stream test predictions into a resumable, gzip-compressed Kaggle submission.

The test set has ~100k images; at 1918x1280 their masks would take ~250 GB, so
``PredictionsSaverCallback`` never keeps more than a bounded number of them:
each batch's probability maps are upsampled, thresholded and run-length encoded
by a small thread pool (cv2 and numpy release the GIL, so this overlaps with
the model's next forward pass), and rows are written chunk by chunk.

On disk, while predicting::

    <path>.partial        gzip members, one per complete chunk of ``chunk_size`` rows
                          (the first member starts with the ``img,rle_mask`` header)
    <path>.partial.json   {"fingerprint", "chunks_done", "partial_bytes"}

Members are compressed with ``mtime=0``, so they are deterministic, and gzip
readers treat concatenated members as one stream. The sidecar is replaced
atomically after the data it describes is fsynced, so after a crash the first
``partial_bytes`` bytes always hold exactly ``chunks_done`` complete chunks.
A new callback built with the same names, chunk size and threshold truncates
anything after them and reports the rest via :meth:`remaining`; the finished
file is byte-identical to that of an uninterrupted run.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from carvana.training.callbacks import Callback
from carvana.data.layout import ORIG_SHAPE, SUBMISSION_HEADER
from carvana.data.postprocess import upsample_mask
from carvana.data.rle import rle_encode

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
COMPRESS_LEVEL = 6  # zlib's default: close to level 9 in size on RLE text, several times faster
TYPICAL_BATCH = 8  # sizes the default in-flight bound; any batch size works
HEADER_LINE = ",".join(SUBMISSION_HEADER) + "\n"


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (skipped where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def upsample_masks_torch(probs: Any, threshold: float) -> np.ndarray:
    """Upsample a (B, h, w) probability tensor to (B, 1280, 1918) bool masks on its own device.

    Same sampling as :func:`carvana.postprocess.upsample_mask` (bilinear, half-pixel
    centres); it can differ only where a value is within float rounding of ``threshold``.
    Used for CUDA tensors, where it is far faster than cv2 and copies back 1 byte/pixel.
    """
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        up = F.interpolate(probs[:, None].float(), size=ORIG_SHAPE, mode="bilinear", align_corners=False)
        return (up[:, 0] > threshold).cpu().numpy()


def _fingerprint(names: Sequence[str], chunk_size: int, threshold: float, header: bool = True, tag: str = "") -> str:
    """Identify a run: a resume is only valid for the same names, chunking, threshold, format
    and ``tag`` (the caller's id of the weights, so rows of two models are never mixed)."""
    h = hashlib.sha256()
    meta = {
        "version": FORMAT_VERSION, "level": COMPRESS_LEVEL, "chunk_size": chunk_size,
        "threshold": repr(threshold), "header": header, "tag": tag,
    }
    h.update(json.dumps(meta, sort_keys=True).encode())
    for name in names:
        h.update(name.encode() + b"\n")
    return h.hexdigest()


def _encode_row(name: str, data: np.ndarray, threshold: float, is_mask: bool) -> tuple[str, float]:
    """Worker job: probability map (or ready mask) -> 'name,rle\\n' and the seconds it took."""
    t0 = time.perf_counter()
    mask = data if is_mask else upsample_mask(data, threshold)
    row = f"{name},{rle_encode(mask)}\n"
    return row, time.perf_counter() - t0


class PredictionsSaverCallback(Callback):
    """Write ``img,rle_mask`` rows for ``names`` (in that order) to ``path`` as gzip, resumably.

    ``names``: every test image name, in prediction order; feed only :meth:`remaining`.
    ``chunk_size``: rows per gzip member, i.e. the granularity of resuming.
    ``workers``: post-processing threads.
    ``max_pending``: images submitted but not yet collected; past it the callback blocks
    on the oldest, so memory is bounded by about ``max_pending + batch`` probability
    maps plus one chunk of rows. Default ``4 * workers * TYPICAL_BATCH``.
    ``gpu_upsample``: upsample+threshold CUDA tensors on the GPU (see :func:`upsample_masks_torch`).
    ``header``: start the file with ``img,rle_mask`` (off for the shards of a sharded prediction).
    ``tag``: identifies the weights; a partial file made with another tag is not resumed.

    Counters: ``rows_written`` (rows appended by this instance), ``rows_resumed`` (rows
    found complete on disk), ``postprocess_seconds`` (upsample+encode time, summed over
    workers), ``chunks_done``.
    """

    def __init__(
        self,
        path: Path,
        names: Sequence[str],
        threshold: float = 0.5,
        chunk_size: int = 256,
        workers: int = 2,
        max_pending: int | None = None,
        gpu_upsample: bool = True,
        header: bool = True,
        tag: str = "",
    ) -> None:
        names = list(names)
        if not names:
            raise ValueError("names is empty: there is nothing to predict")
        bad = [n for n in names if not isinstance(n, str) or not n or any(c in n for c in ",\r\n")]
        if bad:
            raise ValueError(f"invalid image name(s) for a CSV row (empty, or with ',' or a newline): {bad[:3]}")
        dupes = [n for n, c in Counter(names).items() if c > 1]
        if dupes:
            raise ValueError(f"names must be unique; duplicated: {dupes[:3]}")
        if not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        if chunk_size < 1 or workers < 1:
            raise ValueError(f"chunk_size and workers must be >= 1, got {chunk_size} and {workers}")
        max_pending = 4 * workers * TYPICAL_BATCH if max_pending is None else max_pending
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")

        self.path = Path(path)
        self.partial_path = self.path.with_name(self.path.name + ".partial")
        self.sidecar_path = self.path.with_name(self.path.name + ".partial.json")
        self.names = names
        self.threshold = float(threshold)
        self.chunk_size = chunk_size
        self.workers = workers
        self.max_pending = max_pending
        self.gpu_upsample = gpu_upsample
        self.n_chunks = math.ceil(len(names) / chunk_size)
        self.header = header
        self.fingerprint = _fingerprint(names, chunk_size, self.threshold, header, tag)

        self.rows_written = 0
        self.postprocess_seconds = 0.0
        self.chunks_done, self._partial_len = self._recover()
        self.rows_resumed = min(self.chunks_done * chunk_size, len(names))
        self._next = self.rows_resumed  # index of the next name expected from the model
        self._pending: deque[Future[tuple[str, float]]] = deque()
        self._rows: list[str] = []  # collected rows of the chunk being assembled
        self._chunks_queued = self.chunks_done  # chunks handed to the writer
        self._write: Future[int] | None = None  # the one chunk write that may be in flight
        self._pool: ThreadPoolExecutor | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._closed = False

    # ----------------------------------------------------------------- resume
    def _recover(self) -> tuple[int, int]:
        """Return (chunks_done, partial_bytes) from a matching sidecar, else start fresh."""
        self.partial_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            state = json.loads(self.sidecar_path.read_text())
            done, length = int(state["chunks_done"]), int(state["partial_bytes"])
            same = state["fingerprint"] == self.fingerprint
        except FileNotFoundError:
            same = False
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable %s (%s); starting fresh", self.sidecar_path, e)
            same = False
        if same:
            size = self.partial_path.stat().st_size if self.partial_path.exists() else -1
            if 0 <= done <= self.n_chunks and 0 <= length <= size:
                # Drop whatever followed the last recorded member (a half-written chunk).
                os.truncate(self.partial_path, length)
                log.info("resuming %s after %d/%d chunks", self.partial_path, done, self.n_chunks)
                return done, length
            log.warning("%s does not match %s (size %d); starting fresh", self.partial_path, self.sidecar_path, size)
        # Sidecar first: a crash between the two steps must not leave a sidecar describing data we dropped.
        self.sidecar_path.unlink(missing_ok=True)
        self.partial_path.write_bytes(b"")
        return 0, 0

    def remaining(self) -> list[str]:
        """Names still to predict, in order (all of them unless resuming)."""
        return self.names[self._next :]

    # ----------------------------------------------------------------- hooks
    def on_predict_batch_end(self, trainer: Any, names: list[str], probs: Any) -> None:
        """Check the batch is the next expected names and queue its rows for encoding."""
        if self._closed:
            raise RuntimeError("PredictionsSaverCallback already finished; build a new one to predict again")
        names = list(names)
        shape = tuple(probs.shape)
        if len(shape) != 3 or shape[0] != len(names):
            raise ValueError(f"expected probs of shape (B={len(names)}, h, w), got {shape}")
        expected = self.names[self._next : self._next + len(names)]
        if names != expected:
            i = next((k for k, (a, b) in enumerate(zip(names, expected)) if a != b), len(expected))
            want = expected[i] if i < len(expected) else "<end of names: all were predicted>"
            got = names[i] if i < len(names) else "<nothing>"
            raise ValueError(
                f"unexpected image at prediction #{self._next + i}: got {got!r}, expected {want!r}; "
                "build the test loader from remaining(), in order, without shuffling"
            )

        is_mask, arrays = self._to_numpy(probs)
        pool = self._ensure_pools()
        for name, arr in zip(names, arrays):
            self._pending.append(pool.submit(_encode_row, name, arr, self.threshold, is_mask))
        self._next += len(names)
        # Collect whatever finished (in order), then block on the oldest while over the bound.
        while self._pending and (self._pending[0].done() or len(self._pending) > self.max_pending):
            self._collect_oldest()

    def on_predict_end(self, trainer: Any) -> None:
        """Drain, write the last chunk, verify the file and rename it to ``path``."""
        if self._closed:
            raise RuntimeError("PredictionsSaverCallback already finished")
        if self._next != len(self.names):
            raise ValueError(
                f"prediction ended after {self._next} of {len(self.names)} images; "
                f"first missing: {self.names[self._next]!r}"
            )
        while self._pending:
            self._collect_oldest()
        self._wait_write()
        self._shutdown()
        if self.chunks_done != self.n_chunks:
            raise RuntimeError(f"internal error: {self.chunks_done} of {self.n_chunks} chunks written")
        self._verify_partial()
        os.replace(self.partial_path, self.path)
        _fsync_dir(self.path.parent)
        self.sidecar_path.unlink(missing_ok=True)
        log.info(
            "wrote %d rows to %s (%d resumed from an earlier run, %.1f s post-processing)",
            self.rows_written + self.rows_resumed, self.path, self.rows_resumed, self.postprocess_seconds,
        )

    def on_exception(self, trainer: Any, exc: BaseException) -> None:
        """Stop without writing a partial chunk; complete chunks and the sidecar stay for resuming."""
        if self._closed:
            return
        for fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self._rows.clear()
        try:
            self._wait_write()  # a complete chunk already being written is kept
        except Exception as e:  # the original exception matters more; just report this one
            log.warning("writing the last complete chunk failed: %s", e)
        self._shutdown()
        print(
            f"prediction stopped ({type(exc).__name__}): {self.chunks_done}/{self.n_chunks} chunks saved in "
            f"{self.partial_path}; rerunning resumes from chunk {self.chunks_done}",
            file=sys.stderr,
        )

    # ----------------------------------------------------------------- internals
    def _to_numpy(self, probs: Any) -> tuple[bool, np.ndarray]:
        """(is_mask, arrays): CUDA tensors are upsampled on the GPU, the rest go to CPU float32."""
        if hasattr(probs, "detach"):  # a torch tensor; torch is only imported where it is needed
            probs = probs.detach()
            if self.gpu_upsample and probs.is_cuda:
                t0 = time.perf_counter()
                masks = upsample_masks_torch(probs, self.threshold)
                self.postprocess_seconds += time.perf_counter() - t0
                return True, masks
            probs = probs.cpu().float().numpy()
        # Copy: worker threads read the maps later, and the caller may reuse its buffer meanwhile.
        return False, np.array(probs, dtype=np.float32, copy=True)

    def _ensure_pools(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="rle")
            # One writer thread keeps chunks in order and off the main thread.
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="submit-writer")
        return self._pool

    def _shutdown(self) -> None:
        self._closed = True
        for ex in (self._pool, self._writer):
            if ex is not None:
                ex.shutdown(wait=True, cancel_futures=True)

    def _collect_oldest(self) -> None:
        row, seconds = self._pending.popleft().result()
        self.postprocess_seconds += seconds
        self._rows.append(row)
        start = self._chunks_queued * self.chunk_size
        if len(self._rows) == min(self.chunk_size, len(self.names) - start):
            rows, self._rows = self._rows, []
            self._wait_write()  # at most one chunk in flight keeps memory flat
            assert self._writer is not None
            self._write = self._writer.submit(self._append_chunk, self._chunks_queued, rows)
            self._chunks_queued += 1

    def _wait_write(self) -> None:
        if self._write is not None:
            write, self._write = self._write, None
            self.rows_written += write.result()

    def _append_chunk(self, index: int, rows: list[str]) -> int:
        """Writer thread: append one gzip member, fsync, then record it in the sidecar."""
        text = (HEADER_LINE if self.header and index == 0 else "") + "".join(rows)
        member = gzip.compress(text.encode(), compresslevel=COMPRESS_LEVEL, mtime=0)
        with open(self.partial_path, "r+b") as f:
            # Seek to the recorded end rather than append: nothing after it is trusted.
            f.seek(self._partial_len)
            f.write(member)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
        self._partial_len += len(member)
        state = {"fingerprint": self.fingerprint, "chunks_done": index + 1, "partial_bytes": self._partial_len}
        tmp = self.sidecar_path.with_name(self.sidecar_path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        # No directory fsync: if the rename is lost, the older sidecar still describes a valid prefix.
        os.replace(tmp, self.sidecar_path)
        self.chunks_done = index + 1
        return len(rows)

    def _verify_partial(self) -> None:
        """Stream the finished file once: the header, then every name exactly once, in order."""
        with gzip.open(self.partial_path, "rt", newline="") as f:
            if self.header and (header := f.readline()) != HEADER_LINE:
                raise RuntimeError(f"{self.partial_path}: bad header {header!r}")
            count = 0
            for line in f:
                name = line.split(",", 1)[0]
                if count >= len(self.names) or name != self.names[count] or not line.endswith("\n"):
                    raise RuntimeError(f"{self.partial_path}: row {count + 1} is {name!r}, not the expected name")
                count += 1
        if count != len(self.names):
            raise RuntimeError(f"{self.partial_path}: {count} rows written, expected {len(self.names)}")
