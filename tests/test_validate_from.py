"""--validate-from F: epochs before that share of training only train, the rest (and always the
last) validate, and best.pt is chosen among the validated ones; what is refused."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from carvana.pipeline import decide
from carvana.pipeline.plans import PlanError
from carvana.pipeline.settings import parse_command
from carvana.training import classifier as classifier_module
from carvana.training import epoch as epoch_module
from carvana.training.classifier import CarvanaClassifier
from carvana.training.epoch import TrainingSettingError, validates
from carvana.training.logging_callbacks import CSVLogger
from conftest import synthetic_batches
from orchestration_helpers import TINY, fixture_data, ok, run_main  # noqa: F401 (the module-scoped data fixture)
from test_students import defaults


def trainer(share: float, epochs: int, budget: float = 0.0, used: float = 0.0, spent: bool = False
            ) -> SimpleNamespace:
    return SimpleNamespace(validate_from=share, epochs=epochs, time_budget=budget, _budget_used=used,
                           _budget_spent=spent)


def test_the_validated_epochs_are_the_last_share_of_the_epochs_or_of_the_clock():
    on = lambda t: [e for e in range(t.epochs) if validates(t, e)]  # noqa: E731
    assert on(trainer(0.0, 4)) == [0, 1, 2, 3]
    assert on(trainer(0.5, 4)) == [2, 3]
    assert on(trainer(0.3, 10)) == list(range(3, 10))  # 0.3 * 10 is 3, not 3.0000000000000004 rounded up
    assert on(trainer(0.99, 3)) == [2]  # the last epoch always validates
    # Under a budget the clock decides too: epochs that end once the share of it is used, and the last.
    assert not validates(trainer(0.5, 1000, budget=100.0, used=49.9), 5)
    assert validates(trainer(0.5, 1000, budget=100.0, used=50.0), 0)
    assert validates(trainer(0.9, 1000, budget=100.0, used=10.0, spent=True), 3)


@settings(max_examples=40, deadline=None)
@given(share=st.floats(0.0, 0.999), epochs=st.integers(1, 60))
def test_without_a_budget_the_validated_epochs_are_a_nonempty_tail(share, epochs):
    on = [e for e in range(epochs) if validates(trainer(share, epochs), e)]
    assert on and on == list(range(on[0], epochs))  # a tail, ending with the last epoch
    skipped = on[0]  # at most the share of the epochs, and less by under one epoch unless the last must stay
    assert skipped <= share * epochs + 1e-6 and (skipped > share * epochs - 1 or skipped == epochs - 1)


class Counting(list):
    """A validation loader that counts how often it is read."""

    def __init__(self, batches: list) -> None:
        super().__init__(batches)
        self.reads = 0

    def __iter__(self):
        self.reads += 1
        return super().__iter__()


def test_unvalidated_epochs_only_train_and_best_is_chosen_among_validated_ones(tmp_path):
    torch.manual_seed(0)
    valid = Counting(synthetic_batches(1, hw=(32, 32), seed=3))
    clf = CarvanaClassifier(nn.Conv2d(3, 1, 3, padding=1), epochs=4, lr=1e-2, device="cpu", progress=False,
                            validate_from=0.5)
    history = clf.train(synthetic_batches(2, hw=(32, 32)), valid, callbacks=[CSVLogger(tmp_path)])
    assert valid.reads == 2  # epochs 2 and 3
    assert ["valid_dice" in h for h in history] == [False, False, True, True]
    assert [h["is_best"] for h in history[:2]] == [0.0, 0.0]
    assert clf.best_metric == max(h["valid_dice"] for h in history[2:])
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["valid_dice"] == "" for r in rows] == [True, True, False, False]


def test_under_a_budget_validation_starts_once_the_share_of_the_clock_is_used(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(epoch_module.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(classifier_module.time, "perf_counter", lambda: clock[0])

    class Ticking(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                clock[0] += 1.0
            return super().forward(x)

    valid = Counting(synthetic_batches(1, hw=(16, 16), seed=3))
    clf = CarvanaClassifier(Ticking(3, 1, 1), epochs=100, lr=1e-2, device="cpu", progress=False,
                            time_budget=10.0, validate_from=0.6)
    history = clf.train(synthetic_batches(2, hw=(16, 16)), valid)
    # Two one-second steps an epoch: epochs end at 2, 4, 6, 8 and 10 seconds; those from 6 validate.
    assert [("valid_dice" in h) for h in history] == [False, False, True, True, True]
    assert valid.reads == 3


def test_the_classifier_refuses_a_share_out_of_range_and_a_plateau_schedule():
    with pytest.raises(TrainingSettingError, match="--validate-from 1: expected a fraction of training"):
        CarvanaClassifier(nn.Conv2d(3, 1, 1), epochs=2, device="cpu", validate_from=1.0)
    with pytest.raises(TrainingSettingError, match="--scheduler plateau"):
        CarvanaClassifier(nn.Conv2d(3, 1, 1), epochs=2, device="cpu", validate_from=0.5, scheduler="plateau")


@pytest.mark.parametrize("args, phrase", [
    (["--validate-from", "1"], "--validate-from 1: expected a fraction of training"),
    (["--validate-from", "-0.2"], "--validate-from -0.2: expected a fraction of training"),
    (["--validate-from", "nan"], "--validate-from nan: expected a fraction of training"),
    (["--validate-from", "0.5", "--scheduler", "plateau"], "cannot be used with --scheduler plateau"),
])
def test_settings_that_cannot_run_are_refused_in_one_line(args, phrase):
    command = parse_command(defaults(), args)
    with pytest.raises(PlanError) as refusal:
        decide(command.hp, command.given)
    assert phrase in str(refusal.value) and "\n" not in str(refusal.value)


def test_a_run_validates_its_last_epochs_only_and_predicts_from_their_best(data, tmp_path):
    ok(run_main(tmp_path, "--data-dir", str(data), *TINY, "--epochs", "3", "--validate-from", "0.5",
                "--run-name", "vf"))
    rows = list(csv.DictReader(open(tmp_path / "logs" / "vf" / "metrics.csv")))
    assert [r["valid_dice"] == "" for r in rows] == [True, False, False]
    assert any(r["is_best"] == "1.0" for r in rows[1:]) and rows[0]["is_best"] == "0.0"
    assert (tmp_path / "output" / "models" / "vf" / "best.pt").is_file()
    assert (tmp_path / "output" / "submit.csv.gz").is_file()
