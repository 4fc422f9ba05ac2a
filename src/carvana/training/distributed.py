"""torch.distributed glue: everything here is a no-op in a plain single process.

Under ``torchrun`` the environment carries RANK / WORLD_SIZE / LOCAL_RANK; ``init()``
then joins the process group (NCCL on GPUs, gloo on the CPU) and the rest of the
code asks this module who it is instead of reading the environment itself.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as td
from torch import nn
from torch.utils.data import Sampler


def launched_by_torchrun() -> bool:
    """True when the environment describes a multi-process launch."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo and NCCL, made explicit
_timeout_s = DEFAULT_TIMEOUT_S  # the process group's, for messages


class PeerFailure(RuntimeError):
    """Another rank failed at a stage all ranks must pass; this rank stops too."""


def init(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """Join the process group if launched by torchrun; returns the device to use
    ("cuda:<local_rank>" on GPUs, else "cpu" or the given device).

    ``timeout_s``: how long a collective (barrier, all-reduce) waits for a peer that never
    arrives before raising, so a hung or killed rank cannot block the others forever. It
    must cover the longest legitimate wait (rank 0 downloading the data, or finishing its
    prediction shard while the others wait).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not launched_by_torchrun():
        return device
    if device.startswith("cuda"):  # this rank's own GPU, on every call (a tuning run opens one session per trial)
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if td.is_initialized():
        return device
    global _timeout_s
    _timeout_s = timeout_s
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
        td.init_process_group("nccl", device_id=torch.device(device), timeout=timedelta(seconds=timeout_s))
    else:
        td.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    return device


def shutdown() -> None:
    if td.is_initialized():
        td.destroy_process_group()


def is_distributed() -> bool:
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def rank() -> int:
    return td.get_rank() if is_distributed() else 0


def world_size() -> int:
    return td.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes checkpoints, logs and bars."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        td.barrier()


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` when distributed, else ``model`` itself."""
    if not is_distributed():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def maybe_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with SyncBatchNorm layers when distributed on GPUs, else unchanged.

    torch's SyncBatchNorm only runs on accelerators; on the CPU (gloo) each rank keeps
    its own batch statistics, and rank 0 says so once.
    """
    if not is_distributed():
        return model
    if device.type != "cuda":
        if is_main_process():
            print("sync-batchnorm: SyncBatchNorm needs GPUs; on the CPU each process normalises its own batch")
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running stats) to every rank.

    DDP broadcasts buffers at the start of each training forward, so after the last
    step of an epoch every rank holds stats updated by its own last batch. Evaluating
    with those would score slightly different models on different shards.
    """
    if not is_distributed():
        return
    for buf in module.buffers():
        td.broadcast(buf, src=0)


class ShardSampler(Sampler[int]):
    """Indices rank, rank+W, rank+2W, ... of a dataset: every index exactly once over all
    ranks, unlike DistributedSampler, which pads shards to equal length by repeating
    samples (that would count some validation images twice)."""

    def __init__(self, size: int, shard: int | None = None, shards: int | None = None) -> None:
        # Defaults: this process's rank and the world size (0 and 1 outside torchrun).
        self.size = size
        self.rank = rank() if shard is None else shard
        self.world = world_size() if shards is None else shards

    def __iter__(self):
        return iter(range(self.rank, self.size, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world))


def set_epoch(loader: Any, epoch: int) -> None:
    """DistributedSampler shuffles per epoch only if told the epoch number."""
    for sampler in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)


def all_reduce_sums(*values: float) -> tuple[float, ...]:
    """Sum plain numbers over ranks (float64, so image counts and Dice sums stay exact)."""
    if not is_distributed():
        return values
    backend_device = "cuda" if td.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=backend_device)
    td.all_reduce(t)
    return tuple(t.tolist())


def all_reduce_mean(total: torch.Tensor, count: int) -> float:
    """Mean over ranks of a per-rank (sum tensor, count) pair."""
    total_sum, count_sum = all_reduce_sums(float(total.item()), float(count))
    return total_sum / max(count_sum, 1.0)


def ranks_where(flag: torch.Tensor) -> list[int]:
    """The ranks whose boolean ``flag`` is true (every rank gets the same list).

    A collective: every rank must call it at the same point. In one process: [0] or [].
    """
    if not is_distributed():
        return [0] if bool(flag) else []
    backend_device = "cuda" if td.get_backend() == "nccl" else "cpu"
    flags = torch.zeros(world_size(), dtype=torch.int32, device=backend_device)
    flags[rank()] = int(bool(flag))
    td.all_reduce(flags)
    return [r for r, f in enumerate(flags.tolist()) if f]


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the run name, so all ranks agree on folders)."""
    if not is_distributed():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def raise_if_any_failed(error: BaseException | None, stage: str) -> None:
    """All ranks report whether ``stage`` went well (one all-reduce), then all stop if one failed.

    A rank with an ``error`` re-raises it; the others raise :class:`PeerFailure` naming the
    failed rank(s). Every rank must call this at the same point, error or not.
    """
    failed: list[int] = []
    if is_distributed():
        flags = [0.0] * world_size()
        flags[rank()] = 1.0 if error is not None else 0.0
        try:
            failed = [r for r, flag in enumerate(all_reduce_sums(*flags)) if flag]
        except RuntimeError as exc:  # DistBackendError included: a peer hung past the timeout, or died
            if error is not None:
                raise error from None
            raise PeerFailure(f"{stage}: no answer from the other ranks within the process-group timeout "
                              f"({_timeout_s:g} s, --dist-timeout) or a rank died ({str(exc).splitlines()[0][:200]}); "
                              f"rank {rank()} stops. Complete chunks are kept: rerun the same command to resume") from exc
    if error is not None:
        raise error
    if failed:
        raise PeerFailure(f"{stage} failed on rank {', '.join(map(str, failed))} (see its error); rank {rank()} "
                          "stops too. Complete chunks are kept: rerun the same command to resume")
