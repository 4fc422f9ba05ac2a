"""Predict the test set into one submission file, in one process or sharded over ranks.

Chunks of ``chunk_size`` names are the unit of work: in one process they are written in
order by a single PredictionsSaverCallback. Under torchrun rank ``r`` predicts chunks
r, r+W, r+2W, ... into its own shard file (one gzip member per chunk, resumable like the
single file), and rank 0 then interleaves the members back into global order. Each
member is the same bytes either way (gzip with mtime=0), so the sharded file is
byte-identical to the single-process one, provided the model's float results per image
are too (on the CPU they can depend on the thread count; torchrun sets OMP_NUM_THREADS=1).
Several machines need a shared working directory: rank 0 reads every rank's shard.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any, Sequence

from torch.utils.data import DataLoader

from carvana.training import distributed as dist
from carvana.data.datasets import TestImageDataset
from carvana.submission.predictions import PredictionsSaverCallback


def shard_names(names: Sequence[str], chunk_size: int, rank: int, world: int) -> list[str]:
    """The names of global chunks rank, rank+world, ... in order."""
    n_chunks = -(-len(names) // chunk_size)
    return [n for k in range(rank, n_chunks, world) for n in names[k * chunk_size : (k + 1) * chunk_size]]


def gzip_member_ends(path: Path, block: int = 1 << 20) -> list[int]:
    """Byte offsets where each gzip member of ``path`` ends, streaming in ``block``-sized reads."""
    ends, pos = [], 0
    inflater = zlib.decompressobj(wbits=31)
    with open(path, "rb") as f:
        while data := f.read(block):
            while data:
                inflater.decompress(data, 1 << 22)  # output discarded; bounded per call
                while inflater.unconsumed_tail and not inflater.eof:
                    inflater.decompress(inflater.unconsumed_tail, 1 << 22)
                if inflater.eof:
                    used = len(data) - len(inflater.unused_data)
                    pos += used
                    ends.append(pos)
                    data = inflater.unused_data
                    inflater = zlib.decompressobj(wbits=31)
                else:
                    pos += len(data)
                    data = b""
    return ends


def assemble_shards(output: Path, shards: Sequence[Path]) -> None:
    """Interleave the members of ``shards`` (rank order) into ``output``, atomically.

    Shard r must hold global chunks r, r+W, ... (W = len(shards)), one gzip member each.
    """
    missing = [str(s) for s in shards if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"prediction shards not found: {', '.join(missing)} (on several machines the "
                                "working directory must be a shared filesystem)")
    spans = []
    for shard in shards:
        ends = gzip_member_ends(shard)
        if (ends[-1] if ends else 0) != Path(shard).stat().st_size:
            raise ValueError(f"{shard}: does not end with a complete gzip member")
        spans.append(list(zip([0] + ends[:-1], ends)))
    total, world = sum(len(s) for s in spans), len(shards)
    expected = [len(range(r, total, world)) for r in range(world)]
    if [len(s) for s in spans] != expected:
        raise ValueError(f"shards hold {[len(s) for s in spans]} chunks; round-robin over {total} needs {expected}")
    tmp = output.with_name(output.name + ".assembling")
    handles = [open(s, "rb") for s in shards]
    try:
        with open(tmp, "wb") as out:
            for k in range(total):
                rank, local = k % world, k // world
                start, end = spans[rank][local]
                handles[rank].seek(start)
                out.write(handles[rank].read(end - start))
            out.flush()
            os.fsync(out.fileno())
    finally:
        for h in handles:
            h.close()
    os.replace(tmp, output)
    for shard in shards:
        shard.unlink()


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
) -> int:
    """Predict ``test_images`` (in order) into ``output`` (.csv.gz); returns the row count.

    Resumes from complete chunks left by an interrupted run with the same ``tag``.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    names = [p.name for p in test_images]
    by_name = {p.name: p for p in test_images}
    rank, world = dist.rank(), dist.world_size()
    mine = shard_names(names, chunk_size, rank, world)
    path = output if world == 1 else output.with_name(f"{output.name}.rank{rank}-of-{world}")
    if mine:
        saver = PredictionsSaverCallback(path, mine, threshold, chunk_size, postprocess_workers, header=rank == 0, tag=tag)
        todo = [by_name[n] for n in saver.remaining()]
        if len(todo) < len(mine) and dist.is_main_process():
            print(f"prediction: resuming, {len(mine) - len(todo)} rows already written")
        dataset = TestImageDataset(todo, input_hw)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=loader_workers if todo else 0,
                            pin_memory=classifier.device.type == "cuda")
        classifier.predict(loader, [saver], tta=tta)
    if world > 1:
        dist.barrier()
        if dist.is_main_process():
            shards = [output.with_name(f"{output.name}.rank{r}-of-{world}") for r in range(world) if shard_names(names, chunk_size, r, world)]
            assemble_shards(output, shards)
        dist.barrier()
    return len(names)
