"""CarvanaClassifier on tiny synthetic batches: learning, checkpoints, resume, callbacks, failures."""

import csv

import pytest
import torch

from carvana.training.callbacks import Callback
from carvana.training.checkpoint import FORMAT_VERSION, CheckpointError, ModelSaverCallback, load_checkpoint
from carvana.training.classifier import CarvanaClassifier
from carvana.training.logging_callbacks import CSVLogger, PreviewLogger
from carvana.models.unet1024 import UNet1024
from conftest import synthetic_batches


def make_classifier(epochs=2, seed=0, **kw):
    torch.manual_seed(seed)
    return CarvanaClassifier(UNet1024(width=0.125), epochs=epochs, lr=3e-3, device="cpu", progress=False, **kw)


class Counter(Callback):
    def __init__(self):
        self.calls = []

    def on_train_start(self, trainer, start_epoch, epochs):
        self.calls.append(("on_train_start", start_epoch, epochs))

    def on_epoch_end(self, trainer, epoch, metrics, preview):
        self.calls.append(("on_epoch_end", epoch))

    def on_train_end(self, trainer):
        self.calls.append(("on_train_end",))

    def on_predict_start(self, trainer):
        self.calls.append(("on_predict_start",))

    def on_predict_batch_end(self, trainer, names, probs):
        self.calls.append(("on_predict_batch_end", len(names), tuple(probs.shape)))

    def on_predict_end(self, trainer):
        self.calls.append(("on_predict_end",))

    def on_exception(self, trainer, exc):
        self.calls.append(("on_exception", type(exc).__name__))


def test_two_epochs_lower_the_loss_and_report_the_metric():
    train, valid = synthetic_batches(6, seed=1), synthetic_batches(2, seed=2)
    clf = make_classifier(epochs=2)
    history = clf.train(train, valid)
    assert [h["epoch"] for h in history] == [0, 1]
    assert history[1]["train_loss"] < history[0]["train_loss"]
    for h in history:
        assert 0.0 <= h["valid_dice"] <= 1.0 and h["valid_loss"] > 0


def test_callbacks_are_called_in_the_documented_order():
    counter = Counter()
    clf = make_classifier(epochs=3)
    clf.train(synthetic_batches(2), synthetic_batches(1, seed=3), callbacks=[counter])
    test = [{"image": b["image"], "name": b["name"], "ok": torch.tensor([True, False])} for b in synthetic_batches(2, seed=4)]
    clf.predict(test, callbacks=[counter])
    assert counter.calls == [
        ("on_train_start", 0, 3),
        ("on_epoch_end", 0),
        ("on_epoch_end", 1),
        ("on_epoch_end", 2),
        ("on_train_end",),
        ("on_predict_start",),
        ("on_predict_batch_end", 2, (2, 64, 64)),
        ("on_predict_batch_end", 2, (2, 64, 64)),
        ("on_predict_end",),
    ]


def test_unreadable_test_images_get_all_zero_probabilities_and_tta_is_symmetric():
    clf = make_classifier()
    seen = {}

    class Grab(Callback):
        def on_predict_batch_end(self, trainer, names, probs):
            seen["probs"] = probs.clone()

    image = synthetic_batches(1)[0]["image"]
    batch = {"image": torch.cat([image, image.flip(-1)]), "name": list("abcd"), "ok": torch.tensor([True, False, True, True])}
    clf.predict([batch], callbacks=[Grab()], tta=True)
    probs = seen["probs"]
    assert probs[1].abs().sum() == 0 and probs[0].min() > 0
    # with TTA, predicting a mirrored image gives the mirrored prediction
    torch.testing.assert_close(probs[2], probs[0].flip(-1), atol=1e-5, rtol=1e-4)


def test_checkpoint_round_trip_and_resume_continue_with_identical_weights(tmp_path):
    train, valid = synthetic_batches(3, seed=5), synthetic_batches(1, seed=6)
    # uninterrupted: 3 epochs
    straight = make_classifier(epochs=3)
    straight.train(train, valid)
    # interrupted after 2 epochs, then resumed from last.pt in a fresh classifier
    first = make_classifier(epochs=3)
    saver = ModelSaverCallback(tmp_path, {"width": 0.125, "input_size": "64x64"})
    first.train(train, valid, epochs=2, callbacks=[saver])
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["format_version"] == FORMAT_VERSION and state["epoch"] == 1
    assert state["hparams"] == {"width": 0.125, "input_size": "64x64"}
    assert (tmp_path / "best.pt").exists()
    resumed = make_classifier(epochs=3, seed=123)  # different init: everything must come from the file
    resumed.load_state_dict(state)
    for a, b in zip(resumed.model.state_dict().values(), first.model.state_dict().values()):
        assert torch.equal(a, b)
    counter = Counter()
    resumed.train(train, valid, callbacks=[counter])
    assert counter.calls[0] == ("on_train_start", 2, 3) and counter.calls[1] == ("on_epoch_end", 2)
    for a, b in zip(resumed.model.state_dict().values(), straight.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_best_checkpoint_tracks_the_best_valid_dice(tmp_path):
    clf = make_classifier(epochs=3)
    clf.train(synthetic_batches(3), synthetic_batches(1, seed=9), callbacks=[ModelSaverCallback(tmp_path, {})])
    best = load_checkpoint(tmp_path / "best.pt")
    dices = [h["valid_dice"] for h in clf.history]
    assert best["metrics"]["valid_dice"] == max(dices)
    assert best["best_metric"] == max(dices)


class NaNAfter(torch.nn.Module):
    """Wraps a model and returns NaN logits from the ``n``-th training forward on."""

    def __init__(self, model, n):
        super().__init__()
        self.model, self.n, self.calls = model, n, 0

    def forward(self, x):
        out = self.model(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.n:
                return out * float("nan")
        return out


def test_nan_loss_stops_with_a_clear_error_and_leaves_the_last_checkpoint_intact(tmp_path):
    torch.manual_seed(0)
    clf = CarvanaClassifier(NaNAfter(UNet1024(width=0.125), n=5), epochs=3, device="cpu", progress=False)
    saver, counter = ModelSaverCallback(tmp_path, {}), Counter()
    with pytest.raises(FloatingPointError, match="epoch 2.*last good checkpoint"):
        clf.train(synthetic_batches(3), synthetic_batches(1), callbacks=[saver, counter])
    assert counter.calls[-1] == ("on_exception", "FloatingPointError")
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 0 and not state.get("interrupted")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_ctrl_c_saves_the_current_state_and_says_how_to_resume(tmp_path, capsys):
    class CtrlC(Callback):
        def on_epoch_end(self, trainer, epoch, metrics, preview):
            if epoch == 1:
                raise KeyboardInterrupt

    clf = make_classifier(epochs=4)
    saver = ModelSaverCallback(tmp_path, {}, resume_hint="python main.py --resume --run-name demo")
    with pytest.raises(KeyboardInterrupt):
        clf.train(synthetic_batches(2), synthetic_batches(1), callbacks=[saver, CtrlC()])
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["interrupted"] is True and state["epoch"] == 1
    assert "python main.py --resume --run-name demo" in capsys.readouterr().out


def test_loading_a_non_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="last.pt"):
        load_checkpoint(bad)
    torch.save({"model": {}, "format_version": 999}, bad)
    with pytest.raises(CheckpointError, match="version 999"):
        load_checkpoint(bad)


def test_csv_and_preview_logs_one_row_and_one_png_per_epoch(tmp_path):
    clf = make_classifier(epochs=2)
    clf.train(synthetic_batches(2), synthetic_batches(1), callbacks=[CSVLogger(tmp_path), PreviewLogger(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert all(0 <= float(r["valid_dice"]) <= 1 for r in rows)
    assert sorted(p.name for p in tmp_path.glob("preview_epoch*.png")) == ["preview_epoch001.png", "preview_epoch002.png"]
    assert list(tmp_path.glob("events.out.tfevents.*"))  # TensorBoard scalars + image
