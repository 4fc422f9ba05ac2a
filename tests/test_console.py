"""Progress bars: drawn on a terminal, silent in a file or pipe (one line per epoch there instead)."""

from __future__ import annotations

import io
import sys

import torch
from torch import nn

from carvana.training.classifier import CarvanaClassifier
from carvana.training.logging_callbacks import ConsoleLogger
from conftest import synthetic_batches


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_two_epochs(monkeypatch, stderr: io.StringIO) -> str:
    monkeypatch.setattr(sys, "stderr", stderr)
    torch.manual_seed(0)
    classifier = CarvanaClassifier(nn.Conv2d(3, 1, 3, padding=1), epochs=2, device="cpu", progress=True)
    classifier.train(synthetic_batches(3, hw=(16, 16), full_masks=False), None, callbacks=[ConsoleLogger()])
    classifier.predict([{"image": torch.zeros(1, 3, 16, 16), "name": ["a.jpg"]}])
    return stderr.getvalue()


def test_bars_are_drawn_on_a_terminal(monkeypatch):
    drawn = run_two_epochs(monkeypatch, Terminal())
    assert "train 1/2" in drawn and "train 2/2" in drawn and "predict" in drawn and "\r" in drawn


def test_no_bars_off_a_terminal_only_the_epoch_lines(monkeypatch, capsys):
    assert run_two_epochs(monkeypatch, io.StringIO()) == ""
    out = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in out] == ["epoch 1/2", "epoch 2/2"]
