import csv
import pytest

from carvana.training.callbacks import HOOKS, Callback, CallbackList


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_train_start(self, trainer, start_epoch, epochs):
        self.calls.append("on_train_start")

    def on_epoch_end(self, trainer, epoch, metrics, preview):
        self.calls.append("on_epoch_end")


def test_every_hook_is_a_noop_on_the_base_class():
    cb = Callback()
    for hook in HOOKS:
        assert callable(getattr(cb, hook))
    # calling them with the documented arguments does nothing and returns None
    assert cb.on_train_start(None, 0, 1) is None
    assert cb.on_epoch_end(None, 0, {}, None) is None
    assert cb.on_predict_batch_end(None, [], None) is None
    assert cb.on_exception(None, RuntimeError()) is None


def test_misspelled_hook_in_a_subclass_fails_at_class_creation():
    with pytest.raises(TypeError, match="on_epoch_ends"):

        class Typo(Callback):
            def on_epoch_ends(self, trainer, epoch, metrics, preview):
                pass


def test_unknown_hook_on_the_list_fails_loudly():
    with pytest.raises(AttributeError, match="on_batch_end"):
        CallbackList([Callback()]).on_batch_end(None)


def test_list_dispatches_in_order_and_rejects_non_callbacks():
    a, b = Recorder(), Recorder()
    cbs = CallbackList([a, b])
    cbs.on_train_start(None, 0, 3)
    cbs.on_epoch_end(None, 0, {}, None)
    cbs.on_train_end(None)  # a no-op hook on both
    assert a.calls == b.calls == ["on_train_start", "on_epoch_end"]
    with pytest.raises(TypeError):
        CallbackList([object()])


def test_csv_logger_replaces_re_trained_epochs_and_starts_fresh_over_an_old_run(tmp_path):
    from carvana.training.logging_callbacks import CSVLogger

    def epochs_and_losses():
        with open(tmp_path / "metrics.csv", newline="") as f:
            return [(r["epoch"], r["train_loss"]) for r in csv.DictReader(f)]

    logger = CSVLogger(tmp_path)
    for epoch in range(3):
        logger.on_epoch_end(None, epoch, {"epoch": epoch, "train_loss": 1.0 + epoch, "lr": 0.1}, None)
    assert epochs_and_losses() == [("0", "1.0"), ("1", "2.0"), ("2", "3.0")]
    # A resume from epoch 1's checkpoint re-trains epoch 2 onwards: epoch 2's row is replaced, not doubled.
    logger.on_epoch_end(None, 2, {"epoch": 2, "train_loss": 9.0}, None)
    assert epochs_and_losses() == [("0", "1.0"), ("1", "2.0"), ("2", "9.0")]
    # A fresh run under the same name: its first epoch starts a new table.
    CSVLogger(tmp_path).on_epoch_end(None, 0, {"epoch": 0, "train_loss": 5.0}, None)
    assert epochs_and_losses() == [("0", "5.0")]
    assert not (tmp_path / "metrics.csv.tmp").exists()
