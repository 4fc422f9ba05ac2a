"""CPU evaluation streams: several batches through the network at once, one per core.

Why: on a CPU, one forward pass spread over all cores by torch's intra-op threads loses
much of their time at the barriers between operators, and the more so when the loader's
decoding and the submission's post-processing take cores away in between (an OpenMP
thread that is descheduled stalls the others at the next barrier). Giving each core its
own batch instead (one Python thread per stream, each running single-threaded operators,
which release the GIL) keeps every core busy: on the 2-core AMD EPYC, Kaggle-scale
prediction at 128x192 with flip TTA went from ~100 to ~140 images/s
(bench/decode_predict.py, bench/README.md).

``ordered_map`` keeps results in input order, so callbacks (the submission writer, OOF
scoring) see batches exactly as a single stream would deliver them.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

MAX_AUTO_STREAMS = 4  # each stream holds a batch's activations; more cores get more threads per stream


def choose_eval_streams(device: torch.device, requested: int = 0) -> int:
    """How many batches validation and prediction run at once on ``device``.

    CUDA: 1 (the GPU is one stream of work; ``requested`` > 1 is refused). CPU: ``requested``,
    or when 0 one per intra-op thread torch would use (``torch.get_num_threads()``: the
    cores, or what OMP_NUM_THREADS / torchrun allow each process), at most 4.
    """
    if requested < 0:
        raise ValueError(f"--eval-streams must be >= 0 (0 = automatic), got {requested}")
    if device.type != "cpu":
        if requested > 1:
            raise ValueError(f"--eval-streams {requested}: only CPU evaluation runs several streams; "
                             f"{device.type} runs one")
        return 1
    return requested or max(1, min(torch.get_num_threads(), MAX_AUTO_STREAMS))


@contextmanager
def threads_per_stream(streams: int) -> Iterator[int]:
    """Inside, torch's intra-op threads are shared out among ``streams`` (at least one each);
    restored on exit. Yields the threads each stream gets."""
    before = torch.get_num_threads()
    each = max(1, before // streams)
    if each != before:
        torch.set_num_threads(each)
    try:
        yield each
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], streams: int) -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` for each item, in order, ``fn`` running on ``streams`` threads.

    ``items`` is consumed on the calling thread (a DataLoader's iterator stays on one thread),
    at most ``2 * streams`` ahead of what was yielded, which bounds memory. With one stream
    ``fn`` runs on the calling thread, exactly as a plain loop. An exception in ``fn`` is raised
    here, in order; the batches still running finish before it propagates.
    """
    if streams <= 1:
        for item in items:
            yield item, fn(item)
        return
    pending: deque[tuple[T, Future]] = deque()
    source = iter(items)
    with threads_per_stream(streams), ThreadPoolExecutor(streams, thread_name_prefix="eval-stream") as pool:
        try:
            exhausted = False
            while True:
                while not exhausted and len(pending) < 2 * streams:
                    item = next(source, _END)
                    if item is _END:
                        exhausted = True
                    else:
                        pending.append((item, pool.submit(fn, item)))
                if not pending:
                    return
                item, future = pending.popleft()
                yield item, future.result()
        finally:
            for _, future in pending:
                future.cancel()


_END = object()
