"""One gzip member written chunk by chunk, resumable after a crash (kill -9 included).

Some gzip decoders read only the first member of a file, so the submission is a single
member: the 10-byte gzip header, then one raw deflate stream, then the final empty block
and the CRC32/length trailer. Each chunk of text is compressed by a *fresh* raw deflate
compressor and ended with ``Z_FULL_FLUSH``: the segment is byte-aligned, ends a non-final
block and refers to no earlier data. Consequences:

* a chunk's bytes depend only on its text, so a resumed or a sharded run writes exactly
  the bytes of an uninterrupted single-process run;
* shards (``gzip_member=False``: raw segments, no header or trailer) are assembled by
  copying segments in global order; only the CRC must be recomputed (see ``sharded.py``).

Progress lives in a sidecar JSON, replaced atomically after the data it describes is
fsynced: ``partial_bytes`` (where the last complete chunk ends), the running ``crc32`` and
``isize`` of the text, and per chunk ``[compressed bytes, crc32, text bytes]``. After a crash
everything past ``partial_bytes`` is truncated, and a new writer continues from there.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from carvana.data.files import fsync_dir, write_json_atomic  # noqa: F401 (re-exported for the writers)
from carvana.submission.fingerprint import describe_changes

COMPRESS_LEVEL = 1  # bench/gzip_level.py on a full submission's text (1.2 GB): 11 s of one core against 97 s at zlib's default 6, for 7.4% more bytes
# gzip header: magic, deflate, no flags, mtime 0, no extra flags, OS 255 "unknown": the
# same bytes on every machine and every run.
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
FINAL_BLOCK = b"\x03\x00"  # an empty final fixed-Huffman block: ends the deflate stream
READ_BLOCK = 1 << 20
MAX_OUT = 1 << 22  # bound on decompressed bytes per zlib call while streaming


class SubmissionWriteError(OSError):
    """Writing the submission failed (disk full, ...); complete chunks are kept for resuming."""


class OutputLockedError(SubmissionWriteError):
    """Another process is writing the same output right now (it holds the output's lock file)."""


@contextmanager
def exclusive_lock(target: Path) -> Iterator[Path]:
    """Hold ``<target>.lock`` (fcntl.flock) while writing ``target``; if another process holds it,
    raise :class:`OutputLockedError` at once, naming ``target``.

    The kernel drops a flock when its holder dies (kill -9 included), so a lock file a crash left
    behind blocks nothing. The file is removed on release; since a releaser may remove it just as
    another process locks it, a new holder checks that its file is still the one at the path.
    """
    target = Path(target)
    lock = target.with_name(target.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputLockedError(f"{target}: another run is writing it right now (it holds {lock}); "
                                        "wait for that run to end or choose another output") from None
            # A filesystem without flock (some network/FUSE mounts): write unprotected rather than not at all.
            warnings.warn(f"{lock}: cannot lock ({e.strerror}); not protected against a second run", stacklevel=3)
            yield lock
            return
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # removed by its previous holder in between: lock the new file instead
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a person looking
        yield lock
    finally:
        lock.unlink(missing_ok=True)  # first: whoever opened it meanwhile finds it gone and retries
        os.close(fd)


def deflate_chunk(text: bytes, level: int = COMPRESS_LEVEL) -> bytes:
    """Raw deflate segment of ``text`` ending in a full flush (no final block)."""
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    return c.compress(text) + c.flush(zlib.Z_FULL_FLUSH)


def gzip_trailer(crc: int, size: int) -> bytes:
    """The final deflate block and the gzip trailer (CRC32, length mod 2**32)."""
    return FINAL_BLOCK + struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF)


class ChunkedGzipWriter:
    """Append chunks of text to ``partial`` as one gzip member (or raw deflate segments).

    ``identity``: ``{"fingerprint": str, "components": dict}``; a sidecar with another
    fingerprint is not resumed (:meth:`recover` says which components changed).
    ``gzip_member``: write the gzip header first and the trailer in :meth:`finish`; False
    writes bare segments (a shard for ``assemble_shards``).
    """

    def __init__(self, partial: Path, sidecar: Path, identity: dict[str, Any], gzip_member: bool = True,
                 level: int = COMPRESS_LEVEL) -> None:
        self.partial = Path(partial)
        self.sidecar = Path(sidecar)
        self.identity = identity
        self.gzip_member = gzip_member
        self.level = level
        self.start = len(GZIP_HEADER) if gzip_member else 0
        self.offset, self.crc, self.size = self.start, 0, 0
        self.chunks: list[list[int]] = []  # [compressed bytes, crc32, text bytes] per chunk

    @property
    def chunks_done(self) -> int:
        return len(self.chunks)

    def recover(self, n_chunks: int) -> str | None:
        """Continue after the chunks a matching sidecar records, else start an empty file.

        Returns why an existing sidecar was not resumed (None when resumed or there was none).
        """
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        reason = None
        try:
            state = json.loads(self.sidecar.read_text())
            if state.get("fingerprint") != self.identity["fingerprint"]:
                reason = describe_changes(state.get("components") or {}, self.identity["components"])
            else:
                reason = self._resume(state, n_chunks)
                if reason is None:
                    return None
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            reason = f"unreadable progress file {self.sidecar} ({e})"
        # Sidecar first: a crash between the two steps must not leave a sidecar describing data we dropped.
        self.sidecar.unlink(missing_ok=True)
        self.partial.write_bytes(GZIP_HEADER if self.gzip_member else b"")
        self.offset, self.crc, self.size, self.chunks = self.start, 0, 0, []
        return reason

    def _resume(self, state: dict[str, Any], n_chunks: int) -> str | None:
        chunks = [[int(a), int(b), int(c)] for a, b, c in state["chunks"]]
        offset, crc, size = int(state["partial_bytes"]), int(state["crc32"]), int(state["isize"])
        on_disk = self.partial.stat().st_size if self.partial.exists() else -1
        if len(chunks) > n_chunks or offset != self.start + sum(c[0] for c in chunks) or offset > on_disk:
            return f"{self.partial} (size {on_disk}) does not match {self.sidecar}"
        with open(self.partial, "rb") as f:
            if self.gzip_member and f.read(self.start) != GZIP_HEADER:
                return f"{self.partial} does not start with the expected gzip header"
        os.truncate(self.partial, offset)  # drop whatever followed the last recorded chunk
        self.offset, self.crc, self.size, self.chunks = offset, crc, size, chunks
        return None

    def append(self, text: bytes) -> None:
        """Compress and append one chunk, fsync it, then record it in the sidecar."""
        segment = deflate_chunk(text, self.level)
        try:
            with open(self.partial, "r+b") as f:
                f.seek(self.offset)  # seek to the recorded end rather than append: nothing after it is trusted
                f.write(segment)
                f.truncate()
                f.flush()
                os.fsync(f.fileno())
            offset, crc, size = self.offset + len(segment), zlib.crc32(text, self.crc), self.size + len(text)
            chunks = self.chunks + [[len(segment), zlib.crc32(text), len(text)]]
            state = {**self.identity, "chunks_done": len(chunks), "partial_bytes": offset, "crc32": crc,
                     "isize": size, "chunks": chunks}
            # No directory fsync: if the rename is lost, the older sidecar still describes a valid prefix.
            write_json_atomic(self.sidecar, state)
        except OSError as e:
            raise SubmissionWriteError(e.errno, f"writing chunk {len(self.chunks) + 1} to {self.partial} failed: "
                                       f"{e.strerror or e}") from e
        self.offset, self.crc, self.size, self.chunks = offset, crc, size, chunks

    def finish(self) -> None:
        """End the gzip member (final block + trailer) after the last chunk; no-op for raw segments."""
        if not self.gzip_member:
            return
        try:
            with open(self.partial, "r+b") as f:
                f.seek(self.offset)
                f.write(gzip_trailer(self.crc, self.size))
                f.truncate()
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise SubmissionWriteError(e.errno, f"finishing {self.partial} failed: {e.strerror or e}") from e


def _inflate(f: Any, inflater: Any, end: int | None = None) -> Iterator[bytes]:
    """Decompressed pieces of the file object ``f`` (up to byte ``end``), each at most MAX_OUT."""
    remaining = end
    while remaining is None or remaining > 0:
        data = f.read(READ_BLOCK if remaining is None else min(READ_BLOCK, remaining))
        if not data:
            break
        if remaining is not None:
            remaining -= len(data)
        while True:
            try:
                out = inflater.decompress(data, MAX_OUT)
            except zlib.error as e:
                raise ValueError(f"{f.name}: corrupt compressed data ({e})") from None
            data = inflater.unconsumed_tail
            if out:
                yield out
            if inflater.eof:
                if inflater.unused_data or f.read(1):
                    raise ValueError(f"{f.name}: data after the end of the first gzip member")
                return
            if not data and len(out) < MAX_OUT:  # a full buffer may leave output inside zlib
                break


def iter_single_member_lines(path: Path, raw: bool = False) -> Iterator[str]:
    """Lines of a one-member gzip file as a reader that stops after the first member sees them.

    Raises ValueError for a truncated member, a CRC/length mismatch, or a second member.
    ``raw``: the file is bare deflate segments (a shard), read to its end.
    """
    inflater = zlib.decompressobj(-15 if raw else 31)
    tail = b""
    with open(path, "rb") as f:
        for piece in _inflate(f, inflater):
            lines = (tail + piece).split(b"\n")
            tail = lines.pop()
            for line in lines:
                yield line.decode() + "\n"
    if not raw and not inflater.eof:
        raise ValueError(f"{path}: truncated gzip member (no trailer)")
    if tail:
        yield tail.decode()


def iter_segment(f: Any, start: int, length: int) -> Iterator[bytes]:
    """The text a raw deflate segment of ``f`` at ``start`` decompresses to, in bounded pieces."""
    f.seek(start)
    yield from _inflate(f, zlib.decompressobj(-15), end=length)
