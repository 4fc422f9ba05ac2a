"""A non-finite loss on one rank stops every rank with the same clear error (2 gloo processes)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from carvana.training.classifier import CarvanaClassifier

SRC = Path(__file__).resolve().parents[1] / "src"

WORKER = """
import sys
import torch
from torch import nn
sys.path.insert(0, {src!r})
from carvana.training import distributed as dist
from carvana.training.classifier import CarvanaClassifier


class PoisonedOnRank1(nn.Module):
    # rank 1's second forward pass returns NaN logits
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        y = self.conv(x)
        return y * float("nan") if dist.rank() == 1 and self.calls == 2 else y


device = dist.init("cpu")
torch.manual_seed(0)
batches = [{{"image": torch.rand(2, 3, 16, 16), "mask": (torch.rand(2, 1, 16, 16) > 0.5).float()}} for _ in range(4)]
classifier = CarvanaClassifier(PoisonedOnRank1(), epochs=1, device=device, progress=False)
try:
    classifier.train(batches, None)
except FloatingPointError as exc:
    print(f"rank {{dist.rank()}} error: {{exc}}", flush=True)
    sys.exit(1)
print(f"rank {{dist.rank()}} finished", flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nan_on_rank_1_stops_both_ranks_with_the_same_message(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(src=str(SRC)))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for r in (0, 1)]
    deadline = time.monotonic() + 60
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        pytest.fail("a rank was still running 60 s after the NaN: it hangs instead of stopping")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    for r, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode != 0, out
        assert f"rank {r} error: loss is not finite on rank(s) 1 at epoch 1, step 2: training stopped on every rank" in out, out


def test_a_nan_loss_in_one_process_names_the_step_and_stops():
    classifier = CarvanaClassifier(nn.Conv2d(3, 1, 1), epochs=1, device="cpu", progress=False)
    batches = [{"image": torch.full((1, 3, 8, 8), float("nan")), "mask": torch.zeros(1, 1, 8, 8)}]
    with pytest.raises(FloatingPointError, match=r"loss is not finite at epoch 1, step 1"):
        classifier.train(batches, None)
