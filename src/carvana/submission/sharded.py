"""Predict the test set into one submission file, in one process or sharded over ranks.

Chunks of ``chunk_size`` names are the unit of work: in one process they are written in
order by a single PredictionsSaverCallback. Under torchrun rank ``r`` predicts chunks
r, r+W, r+2W, ... into its own shard: bare deflate segments, one per chunk, resumable like
the single file, with a record (``<shard>.json``) listing each segment's length, CRC32 and
text length. Rank 0 then copies the segments in global order behind one gzip header and
ends the member with the CRC32 of the whole text (recomputed by inflating each segment,
which also checks it against the shard's record). A segment's bytes depend only on its
chunk's text, so the sharded file is byte-identical to the single-process one, provided
the model's float results per image are too (on the CPU they can depend on the thread
count; torchrun sets OMP_NUM_THREADS=1). Several machines need a shared working
directory: rank 0 reads every rank's shard.

Failures: after predicting, and again after assembling, all ranks all-reduce an "ok" flag;
a rank that failed re-raises its error and the others raise ``PeerFailure``, so every rank
exits within seconds of the slowest one finishing its shard. A rank that hangs instead is
bounded by the process-group timeout (``--dist-timeout``, see ``distributed.init``).
"""

from __future__ import annotations

import json
import os
import zlib
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from torch.utils.data import DataLoader

from carvana.training import distributed as dist
from carvana.training.evaluation import prediction_dataset
from carvana.submission.fingerprint import (check_finished, file_sha256, fingerprint_of, marker_path,
                                            prediction_components, weights_digest)
from carvana.submission.gzip_stream import (COMPRESS_LEVEL, GZIP_HEADER, SubmissionWriteError, exclusive_lock,
                                            fsync_dir, gzip_trailer, iter_segment, write_json_atomic)
from carvana.submission.predictions import HEADER_LINE, PredictionsSaverCallback
from carvana.submission.progress import DEFAULT_INTERVAL_S
from carvana.submission.rows import verify_rows


def shard_names(names: Sequence[str], chunk_size: int, rank: int, world: int) -> list[str]:
    """The names of global chunks rank, rank+world, ... in order."""
    n_chunks = -(-len(names) // chunk_size)
    return [n for k in range(rank, n_chunks, world) for n in names[k * chunk_size : (k + 1) * chunk_size]]


def shard_path(output: Path, rank: int, world: int) -> Path:
    return output.with_name(f"{output.name}.rank{rank}-of-{world}")


def _shard_index(shard: Path) -> list[list[int]]:
    """A finished shard's [compressed bytes, crc32, text bytes] per chunk, checked against its size."""
    if not shard.is_file() or not marker_path(shard).is_file():
        raise FileNotFoundError(f"prediction shard {shard} (or its record {marker_path(shard).name}) not found (on "
                                "several machines the working directory must be a shared filesystem)")
    try:
        chunks = [[int(a), int(b), int(c)] for a, b, c in json.loads(marker_path(shard).read_text())["chunks"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{marker_path(shard)}: unreadable shard record ({e})") from e
    if sum(c[0] for c in chunks) != shard.stat().st_size:
        raise ValueError(f"{shard}: {shard.stat().st_size} bytes, its record lists {sum(c[0] for c in chunks)}: "
                         "it does not end with a complete chunk")
    return chunks


def assemble_shards(output: Path, shards: Sequence[Path], names: Sequence[str] | None = None,
                    identity: Mapping[str, Any] | None = None) -> None:
    """Join the chunks of ``shards`` (rank order) into ``output``, one gzip member, atomically.

    Shard r must hold global chunks r, r+W, ... (W = len(shards)) as bare deflate segments,
    with a record ``<shard>.json`` (what ``PredictionsSaverCallback(raw=True)`` writes).
    ``names``: verify the result has exactly these rows, in order. ``identity``
    (fingerprint and components of the whole prediction): write ``<output>.json`` too.
    """
    output = Path(output)
    shards = [Path(s) for s in shards]
    index = [_shard_index(s) for s in shards]
    total, world = sum(len(c) for c in index), len(shards)
    expected = [len(range(r, total, world)) for r in range(world)]
    if [len(c) for c in index] != expected:
        raise ValueError(f"shards hold {[len(c) for c in index]} chunks; round-robin over {total} needs {expected}")
    starts = [[sum(c[0] for c in chunks[:i]) for i in range(len(chunks))] for chunks in index]
    tmp = output.with_name(output.name + ".assembling")
    handles = [open(s, "rb") for s in shards]
    crc = size = 0
    chunks = []
    try:
        with open(tmp, "wb") as out:
            out.write(GZIP_HEADER)
            for k in range(total):
                rank, local = k % world, k // world
                length, chunk_crc, chunk_size = index[rank][local]
                # zlib has no crc32_combine in Python: the whole text's CRC comes from
                # inflating each segment, which also checks it against the shard's record.
                seg_crc = seg_size = 0
                for piece in iter_segment(handles[rank], starts[rank][local], length):
                    seg_crc, seg_size = zlib.crc32(piece, seg_crc), seg_size + len(piece)
                    crc = zlib.crc32(piece, crc)
                if (seg_crc, seg_size) != (chunk_crc, chunk_size):
                    raise ValueError(f"{shards[rank]}: chunk {local + 1} does not match its record (CRC32/length)")
                size += seg_size
                handles[rank].seek(starts[rank][local])
                out.write(handles[rank].read(length))
                chunks.append(index[rank][local])
            out.write(gzip_trailer(crc, size))
            out.flush()
            os.fsync(out.fileno())
    finally:
        for h in handles:
            h.close()
    if names is not None:
        verify_rows(tmp, names, HEADER_LINE)
    if identity is not None:
        write_json_atomic(marker_path(output), {**identity, "rows": len(names) if names is not None else None,
                                                "bytes": tmp.stat().st_size, "sha256": file_sha256(tmp),
                                                "chunks": chunks})
    os.replace(tmp, output)
    fsync_dir(output.parent)
    for shard in shards:
        shard.unlink()
        marker_path(shard).unlink(missing_ok=True)


def prediction_settings(classifier: Any, input_hw: tuple[int, int], tta: bool, fast_decode: bool = True
                        ) -> dict[str, Any]:
    """The fingerprint components a classifier adds: everything besides names/chunks/threshold that
    changes a row (``fast_decode``: JPEGs decoded at a DCT scale, or in full)."""
    if hasattr(classifier, "prediction_settings"):  # an ensemble describes all of its members
        return classifier.prediction_settings(input_hw, tta, fast_decode=fast_decode)
    config = getattr(classifier, "model_config", None)
    return {
        "tta": bool(tta), "fast_decode": bool(fast_decode), "input_size": list(input_hw),
        "model_config": config.to_dict() if config is not None else None,
        "weights": weights_digest(classifier.model.state_dict()),  # the contents, not a file's path or mtime
        "precision": str(getattr(classifier, "amp_dtype", None) or "float32"),
        **engine_component(classifier),
    }


def engine_component(classifier: Any) -> dict[str, str]:
    """The engine that predicts, where it is not torch (a torch prediction keeps the fingerprint
    it always had)."""
    slot = getattr(classifier, "engine", None)
    return {"engine": slot.identity} if slot is not None else {}


def predict_to_submission(
    classifier: Any,
    test_images: Sequence[Path],
    output: Path,
    input_hw: tuple[int, int],
    threshold: float = 0.5,
    chunk_size: int = 256,
    postprocess_workers: int = 2,
    batch_size: int = 8,
    loader_workers: int = 2,
    tta: bool = False,
    tag: str = "",
    settings: Mapping[str, Any] | None = None,
    progress_interval_s: float = DEFAULT_INTERVAL_S,
    fast_decode: bool = True,
) -> int:
    """Predict ``test_images`` (in order) into ``output`` (.csv.gz); returns the row count.

    Resumes from the complete chunks of an interrupted run with the same fingerprint (names,
    chunking, threshold, TTA, ``fast_decode``, input size, model config, weights' contents,
    ``tag``, ``settings``), and predicts nothing if ``output`` is already complete for it. Off a
    terminal, rank 0 prints a progress line at most every ``progress_interval_s`` seconds.
    ``fast_decode``: JPEGs decoded at the DCT scale for the input size (False: in full).
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    names = [p.name for p in test_images]
    by_name = {p.name: p for p in test_images}
    settings = {**prediction_settings(classifier, input_hw, tta, fast_decode), **(settings or {})}
    rank, world = dist.rank(), dist.world_size()
    main = dist.is_main_process()
    up_to_date = f"prediction: {output} is already complete for these images, settings and weights; not predicting again"

    def predict(saver: PredictionsSaverCallback) -> None:
        todo = [by_name[n] for n in saver.remaining()]
        if saver.already_complete:
            saver.on_predict_end(classifier)  # nothing to predict: just close it
            if main:
                print(up_to_date)
            return
        if len(todo) < len(saver.names) and main:
            print(f"prediction: resuming, {len(saver.names) - len(todo)} rows already written")
        loader = DataLoader(prediction_dataset(classifier, todo, input_hw, fast_decode), batch_size=batch_size,
                            num_workers=loader_workers if todo else 0, pin_memory=classifier.device.type == "cuda")
        classifier.predict(loader, [saver], tta=tta)

    if world == 1:
        with exclusive_lock(output):  # a second run would truncate this one's progress
            predict(PredictionsSaverCallback(output, names, threshold, chunk_size, postprocess_workers, tag=tag,
                                             settings=settings, progress_interval_s=progress_interval_s))
        return len(names)
    with ExitStack() as locks:
        error: BaseException | None = None
        try:  # each process locks what it writes: its shard, and rank 0 the output it assembles
            if main:
                locks.enter_context(exclusive_lock(output))
            locks.enter_context(exclusive_lock(shard_path(output, rank, world)))
        except SubmissionWriteError as exc:
            error = exc
        dist.raise_if_any_failed(error, f"locking {output}")
        _predict_sharded(predict, output, names, threshold, chunk_size, postprocess_workers, tag, settings, up_to_date,
                         progress_interval_s)
    return len(names)


def _predict_sharded(predict: Callable[[PredictionsSaverCallback], None], output: Path, names: list[str],
                     threshold: float, chunk_size: int, postprocess_workers: int, tag: str,
                     settings: Mapping[str, Any], up_to_date: str, progress_interval_s: float) -> None:
    """Under torchrun: this rank's chunks into its shard, then rank 0 assembles ``output``."""
    rank, world, main = dist.rank(), dist.world_size(), dist.is_main_process()
    # The whole file's identity, as a single process would record it.
    components = prediction_components(names, chunk_size, threshold, True, tag, settings, COMPRESS_LEVEL)
    components["container"] = "gzip"
    identity = {"fingerprint": fingerprint_of(components), "components": components}
    if dist.broadcast_object(check_finished(output, identity)[0] if main else None):
        if main:
            print(up_to_date)
        return
    error: BaseException | None = None
    try:
        mine = shard_names(names, chunk_size, rank, world)
        if mine:
            predict(PredictionsSaverCallback(shard_path(output, rank, world), mine, threshold, chunk_size,
                                             postprocess_workers, header=rank == 0, tag=tag, settings=settings, raw=True,
                                             progress_interval_s=progress_interval_s))
    except BaseException as exc:  # every rank must reach the all-reduce below, error or not
        error = exc
    dist.raise_if_any_failed(error, "prediction")
    try:
        if main:
            shards = [shard_path(output, r, world) for r in range(world) if shard_names(names, chunk_size, r, world)]
            assemble_shards(output, shards, names, identity)
    except BaseException as exc:
        error = exc
    dist.raise_if_any_failed(error, f"assembling {output}")
