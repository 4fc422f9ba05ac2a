"""Stream test predictions into a resumable, one-member gzip Kaggle submission.

The test set has ~100k images; at 1918x1280 their masks would take ~250 GB, so
``PredictionsSaverCallback`` never keeps more than a bounded number of them:
each batch's probability maps are upsampled, thresholded and run-length encoded
by a small thread pool (cv2 and numpy release the GIL, so this overlaps with
the model's next forward pass; :class:`carvana.submission.chunk_pipeline.ChunkPipeline`
keeps them in order), and rows are written chunk by chunk by
:class:`carvana.submission.gzip_stream.ChunkedGzipWriter` (one gzip member, a full
flush per chunk; see there for the on-disk format).

On disk, while predicting::

    <path>.partial        the gzip member so far: header + one deflate segment per complete chunk
    <path>.partial.json   progress: fingerprint and its components, chunks, CRC32, length

and once finished::

    <path>                the submission (one gzip member)
    <path>.json           its record: fingerprint, components, rows, size, SHA-256, chunk index

A new callback built with the same names and settings (see
:func:`carvana.submission.fingerprint.prediction_components`) resumes after the last
complete chunk, or recognises a finished file and predicts nothing; the finished file is
byte-identical to that of an uninterrupted run. With other settings it starts over and
says which setting changed.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from carvana.training.callbacks import Callback
from carvana.data.layout import SUBMISSION_HEADER
from carvana.submission.chunk_pipeline import ChunkPipeline
from carvana.submission.fingerprint import (check_finished, file_sha256, fingerprint_of, marker_path,
                                            prediction_components)
from carvana.submission.gzip_stream import (COMPRESS_LEVEL, ChunkedGzipWriter, SubmissionWriteError,
                                            fsync_dir, write_json_atomic)
from carvana.submission.rows import _encode_row, check_names, to_arrays, upsample_masks_torch  # noqa: F401
from carvana.submission.progress import DEFAULT_INTERVAL_S, ProgressLine
from carvana.submission.rows import verify_rows

log = logging.getLogger(__name__)

TYPICAL_BATCH = 8  # sizes the default in-flight bound; any batch size works
HEADER_LINE = ",".join(SUBMISSION_HEADER) + "\n"


class PredictionsSaverCallback(Callback):
    """Write ``img,rle_mask`` rows for ``names`` (in that order) to ``path`` as gzip, resumably.

    ``names``: every test image name, in prediction order; feed only :meth:`remaining`.
    ``chunk_size``: rows per chunk (one full-flushed deflate segment), the granularity of resuming.
    ``workers``: post-processing threads.
    ``max_pending``: images submitted but not yet collected; past it the callback blocks
    on the oldest, so memory is bounded by about ``max_pending + batch`` probability
    maps plus one chunk of rows. Default ``4 * workers * TYPICAL_BATCH``.
    ``gpu_upsample``: upsample+threshold CUDA tensors on the GPU (see :func:`upsample_masks_torch`).
    ``header``: start the file with ``img,rle_mask`` (off for all but the first shard).
    ``tag``, ``settings``: further fingerprint components (``settings`` a dict of JSON values,
    e.g. TTA, input size, model config, weights digest); a partial or finished file made with
    other values is not reused.
    ``raw``: write bare deflate segments without gzip header/trailer (a shard for
    :func:`carvana.submission.sharded.assemble_shards`).
    ``progress_interval_s``: off a terminal, rank 0 prints a progress line at most this often.

    Counters: ``rows_written`` (rows appended by this instance), ``rows_resumed`` (rows
    found complete on disk), ``postprocess_seconds`` (upsample+encode time, summed over
    workers), ``chunks_done``; ``already_complete`` when a finished file was recognised.
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
        settings: Mapping[str, Any] | None = None,
        raw: bool = False,
        progress_interval_s: float = DEFAULT_INTERVAL_S,
    ) -> None:
        names = list(names)
        check_names(names)
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
        self.record_path = marker_path(self.path)
        self.names = names
        self.threshold = float(threshold)
        self.chunk_size = chunk_size
        self.workers = workers
        self.max_pending = max_pending
        self.gpu_upsample = gpu_upsample
        self.n_chunks = math.ceil(len(names) / chunk_size)
        self.header = header
        self.raw = raw
        self.components = prediction_components(names, chunk_size, self.threshold, header, tag, settings, COMPRESS_LEVEL)
        self.components["container"] = "raw deflate segments (shard)" if raw else "gzip"
        self.fingerprint = fingerprint_of(self.components)
        identity = {"fingerprint": self.fingerprint, "components": self.components}
        self._file = ChunkedGzipWriter(self.partial_path, self.sidecar_path, identity, gzip_member=not raw)

        self._upsample_seconds = 0.0  # this thread's share of postprocess_seconds
        self.already_complete, why_not = check_finished(self.path, identity)
        if self.already_complete:
            self.chunks_done = self.n_chunks
            log.info("%s is already complete (same names and settings): nothing to predict", self.path)
        else:
            if why_not and self.record_path.exists():
                print(f"{why_not}; predicting it again", file=sys.stderr)
            self.chunks_done = self._recover()
        self.rows_resumed = min(self.chunks_done * chunk_size, len(names))
        self.progress = ProgressLine(len(names) - self.rows_resumed, "prediction, this rank's shard" if raw
                                     else "prediction", progress_interval_s)
        self._next = self.rows_resumed  # index of the next name expected from the model
        # _append_chunk is looked up per chunk, not bound once, so a test can wrap it on the class.
        self._chunks = ChunkPipeline(lambda index, rows: self._append_chunk(index, rows), len(names), chunk_size,
                                     self.chunks_done, workers, max_pending)
        self._closed = False  # finished or stopped: no more batches
        self._stopped = False  # cleaned up and reported (on_exception) or finished

    @property
    def rows_written(self) -> int:
        """Rows appended to the file by this instance (resumed rows not counted)."""
        return self._chunks.rows_written

    @property
    def postprocess_seconds(self) -> float:
        """Upsample + threshold + encode time, summed over the threads that did it."""
        return self._upsample_seconds + self._chunks.seconds

    # ----------------------------------------------------------------- resume
    def _recover(self) -> int:
        """Chunks already on disk from a run with the same fingerprint (else start fresh, saying why)."""
        why = self._file.recover(self.n_chunks)
        if why is not None:
            print(f"{self.partial_path}: not resuming the earlier prediction: {why}; starting over", file=sys.stderr)
        elif self._file.chunks_done:
            log.info("resuming %s after %d/%d chunks", self.partial_path, self._file.chunks_done, self.n_chunks)
        return self._file.chunks_done

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

        is_mask, arrays, seconds = to_arrays(probs, self.threshold, self.gpu_upsample)
        self._upsample_seconds += seconds
        for name, arr in zip(names, arrays):
            self._chunks.submit(_encode_row, name, arr, self.threshold, is_mask)
        self._next += len(names)
        self._chunks.collect()  # what finished, in order; blocks on the oldest while over max_pending
        self.progress.advance(len(names))

    def on_predict_start(self, trainer: Any) -> None:
        self.progress.restart()

    def on_predict_end(self, trainer: Any) -> None:
        """Drain, write the last chunk, end the gzip member, verify, record and rename it to ``path``.

        An error here (disk full while writing the last chunks, ...) gets the same cleanup and
        message as one during prediction (:meth:`on_exception`): complete chunks stay for resuming.
        """
        if self._closed:
            raise RuntimeError("PredictionsSaverCallback already finished")
        if self._next != len(self.names):
            raise ValueError(
                f"prediction ended after {self._next} of {len(self.names)} images; "
                f"first missing: {self.names[self._next]!r}"
            )
        if self.already_complete:
            self._shutdown()
            self._stopped = True
            return
        try:
            self._finish()
            self._stopped = True
            self.progress.finish()
        except BaseException as exc:
            self.on_exception(trainer, exc)
            raise

    def _finish(self) -> None:
        self._chunks.drain()
        self._shutdown()
        if self.chunks_done != self.n_chunks:
            raise RuntimeError(f"internal error: {self.chunks_done} of {self.n_chunks} chunks written")
        self._file.finish()
        try:  # read back as a decoder that stops after the first gzip member would
            verify_rows(self.partial_path, self.names, HEADER_LINE if self.header else "", raw=self.raw)
        except ValueError as e:
            raise RuntimeError(f"verifying the written submission failed: {e}") from e
        size = self.partial_path.stat().st_size
        record = {"fingerprint": self.fingerprint, "components": self.components, "rows": len(self.names),
                  "bytes": size, "sha256": file_sha256(self.partial_path), "chunks": self._file.chunks}
        try:
            # Record first, then rename: a crash in between leaves a record that does not match
            # the file at ``path`` (absent or older), so the next run finishes from the sidecar.
            write_json_atomic(self.record_path, record)
            os.replace(self.partial_path, self.path)
            fsync_dir(self.path.parent)
        except OSError as e:
            raise SubmissionWriteError(e.errno, f"finishing {self.path} failed: {e.strerror or e}") from e
        self.sidecar_path.unlink(missing_ok=True)
        log.info(
            "wrote %d rows to %s (%d resumed from an earlier run, %.1f s post-processing)",
            self.rows_written + self.rows_resumed, self.path, self.rows_resumed, self.postprocess_seconds,
        )

    def on_exception(self, trainer: Any, exc: BaseException) -> None:
        """Stop without writing a partial chunk; complete chunks and the sidecar stay for resuming."""
        if self._stopped:
            return
        self._stopped = True
        self._chunks.cancel()
        try:
            self._chunks.wait_write()  # a complete chunk already being written is kept
        except Exception as e:  # the original exception matters more; just report this one
            log.warning("writing the last complete chunk failed: %s", e)
        self._shutdown()
        self._report(exc)

    def _report(self, exc: BaseException) -> None:
        what = f": {exc}" if isinstance(exc, OSError) else ""
        if self.chunks_done == self.n_chunks:
            resume = "rerunning the same command finishes it without predicting again"
        else:
            resume = f"rerunning the same command resumes from chunk {self.chunks_done + 1}"
        print(
            f"prediction stopped ({type(exc).__name__}{what}): {self.chunks_done}/{self.n_chunks} chunks saved in "
            f"{self.partial_path}; {resume}",
            file=sys.stderr,
        )

    # ----------------------------------------------------------------- internals
    def _shutdown(self) -> None:
        self._closed = True
        self._chunks.shutdown()

    def _append_chunk(self, index: int, rows: list[str]) -> int:
        """Writer thread: append chunk ``index`` (fsynced, then recorded in the sidecar)."""
        text = (HEADER_LINE if self.header and index == 0 else "") + "".join(rows)
        self._file.append(text.encode())
        self.chunks_done = index + 1
        return len(rows)
