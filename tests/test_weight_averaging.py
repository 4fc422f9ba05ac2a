"""--ema: the average's arithmetic, the swap, validation and checkpoints with the average, exact resume."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn

from carvana.models.unet1024 import UNet1024
from carvana.models.registry import ModelConfig
from carvana.training.averaging import WeightAverage
from carvana.training.checkpoint import ModelSaverCallback, load_checkpoint, load_model, save_checkpoint
from carvana.training.classifier import CarvanaClassifier
from carvana.training.epoch import TrainingSettingError
from conftest import synthetic_batches

CONFIG = ModelConfig(arch="unet1024", width=0.125, input_size=(64, 64))


def make_classifier(epochs: int = 2, seed: int = 0, **kw) -> CarvanaClassifier:
    torch.manual_seed(seed)
    return CarvanaClassifier(UNet1024(width=0.125), epochs=epochs, lr=3e-3, device="cpu", progress=False,
                             model_config=CONFIG, **kw)


def small_classifier(epochs: int = 2, seed: int = 0, **kw) -> CarvanaClassifier:
    """Conv-BatchNorm-ReLU-conv (the BatchNorm folds on the CPU copy): fast where the network's size doesn't matter."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 1))
    return CarvanaClassifier(net, epochs=epochs, lr=1e-2, device="cpu", progress=False, **kw)


def conv_bn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1))


def set_state(model: nn.Module, value: float, count: int) -> None:
    """Every floating-point parameter and buffer to ``value`` (running_var to 2 * value), except
    the conv bias, which stays put (as frozen weights do); num_batches_tracked to ``count``."""
    conv, bn = model[0], model[1]
    with torch.no_grad():
        conv.weight.fill_(value)
        bn.weight.fill_(-value)
        bn.bias.fill_(value / 2)
        bn.running_mean.fill_(value)
        bn.running_var.fill_(2 * value)
        bn.num_batches_tracked.fill_(count)


def test_the_average_follows_a_hand_computed_ema_with_warm_up():
    model = conv_bn()
    set_state(model, 1.0, 0)
    bias = model[0].bias.detach().clone()
    average = WeightAverage(model, decay=0.2)
    expected, values = 1.0, [3.0, -2.0, 5.0, 0.5]
    # Warm-up decays (1 + n) / (10 + n): 0.1, 2/11, then 3/12 = 0.25 > 0.2, so 0.2 from the third update on.
    decays = [0.1, 2 / 11, 0.2, 0.2]
    for n, (value, decay) in enumerate(zip(values, decays)):
        assert average.current_decay() == pytest.approx(decay)
        set_state(model, value, n + 1)
        average.update(model)
        expected = decay * expected + (1 - decay) * value
        w = average.weights
        assert w["0.weight"].item() == pytest.approx(expected, rel=1e-6)
        assert w["1.weight"].item() == pytest.approx(-expected, rel=1e-6)
        assert w["1.bias"].item() == pytest.approx(expected / 2, rel=1e-6)
        assert w["1.running_mean"].item() == pytest.approx(expected, rel=1e-6)  # buffers averaged too
        assert w["1.running_var"].item() == pytest.approx(2 * expected, rel=1e-6)
        assert w["1.num_batches_tracked"].item() == n + 1  # copied, not averaged
        assert torch.equal(w["0.bias"], bias)  # a weight that never moves stays bit-identical
    assert average.updates == 4 and all(t.dtype in (torch.float32, torch.int64) for t in average.weights.values())


def test_decay_zero_is_the_live_weights_and_a_bad_decay_is_refused():
    model = conv_bn()
    average = WeightAverage(model, decay=0.0)
    set_state(model, 4.0, 7)
    average.update(model)
    assert all(torch.equal(a, b) for a, b in zip(average.weights.values(), model.state_dict().values()))
    for value in (1.0, 1.5, -0.1, math.nan):
        with pytest.raises(TrainingSettingError, match=rf"^--ema {value:g}: expected a decay"):
            CarvanaClassifier(nn.Conv2d(3, 1, 1), epochs=1, device="cpu", ema=value)


def test_the_swap_restores_the_training_weights_exactly_even_on_an_exception():
    model = conv_bn()
    set_state(model, 1.0, 3)
    average = WeightAverage(model, decay=0.5)
    set_state(model, 1.0 / 3.0, 5)  # values whose float round trip would show
    average.update(model)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="inside"):
        with average.swapped_into(model):
            for name, t in model.state_dict().items():
                assert torch.equal(t, average.weights[name].to(t.dtype))
            raise RuntimeError("inside")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in raw.items())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch run with --ema 0.5 (averaged != training weights), checkpoints in a temp folder."""
    folder = tmp_path_factory.mktemp("ema-run")  # pytest's temp root: removed with the old ones, never leaked
    train, valid = synthetic_batches(3, seed=1), synthetic_batches(1, seed=2)
    clf = make_classifier(epochs=2, ema=0.5)
    clf.train(train, valid, callbacks=[ModelSaverCallback(folder, {"width": 0.125, "input_size": "64x64"})])
    return clf, valid, folder


def test_validation_scores_the_averaged_weights_and_no_stale_folded_copy(trained):
    clf, valid, _ = trained
    assert clf.inference is not None  # the CPU copy with folded BatchNorms: what could go stale
    raw_before = clf.validate(valid)[:2]
    with clf.averaged_weights():
        averaged = clf.validate(valid)[:2]
    raw_after = clf.validate(valid)[:2]
    assert raw_after == raw_before  # the copy was refreshed back to the training weights
    assert averaged != raw_before  # ...and to the average inside: the figures differ
    assert clf.history[-1]["valid_loss"] == pytest.approx(averaged[0], rel=1e-6)
    assert clf.history[-1]["valid_dice"] == pytest.approx(averaged[1], rel=1e-6)
    # A fresh classifier (no cached copy) holding the average scores the same.
    fresh = make_classifier(seed=9)
    fresh.load_state_dict(clf.state_dict(), weights_only=True)
    assert fresh.validate(valid)[:2] == pytest.approx(averaged, rel=1e-6)


def test_checkpoints_hold_the_average_as_model_and_best_predicts_with_it(trained):
    clf, valid, folder = trained
    last = load_checkpoint(folder / "last.pt")
    assert last["ema"]["updates"] == clf.average.updates == 6 and last["ema"]["decay"] == 0.5
    for name, t in clf.model.state_dict().items():
        assert torch.equal(last["model"][name], clf.average.weights[name])
        assert torch.equal(last["ema"]["raw_model"][name], t)
    # best.pt through the normal load path (as prediction, ensembles, segment, export do): the
    # network it rebuilds scores what its epoch's (averaged) validation recorded.
    best = load_checkpoint(folder / "best.pt")
    model, config, _ = load_model(folder / "best.pt")
    assert config == CONFIG
    torch.manual_seed(0)
    scorer = CarvanaClassifier(model, epochs=1, device="cpu", progress=False, model_config=config)
    loss, dice, _ = scorer.validate(valid)
    assert (loss, dice) == pytest.approx((best["metrics"]["valid_loss"], best["metrics"]["valid_dice"]), rel=1e-6)


def test_resume_from_last_continues_like_an_uninterrupted_run(tmp_path):
    train, valid = synthetic_batches(3, hw=(32, 32), seed=5), synthetic_batches(1, hw=(32, 32), seed=6)
    straight = small_classifier(epochs=3, ema=0.8)
    straight.train(train, valid)
    first = small_classifier(epochs=3, ema=0.8)
    first.train(train, valid, epochs=2, callbacks=[ModelSaverCallback(tmp_path, {})])
    resumed = small_classifier(epochs=3, seed=123, ema=0.8)  # another init: all must come from the file
    resumed.load_state_dict(load_checkpoint(tmp_path / "last.pt"))
    assert resumed.average.updates == 6 and resumed.epoch == 1
    resumed.train(train, valid)
    for name, t in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], t, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(resumed.average.weights[name], straight.average.weights[name], rtol=1e-5, atol=1e-6)
    assert resumed.history[-1]["valid_loss"] == pytest.approx(straight.history[-1]["valid_loss"], rel=1e-4)


def test_checkpoints_without_an_average_still_load(tmp_path):
    plain = small_classifier(seed=1)
    plain.train(synthetic_batches(1, hw=(16, 16), full_masks=False), None, epochs=1)
    save_checkpoint(plain.state_dict(), tmp_path / "old.pt")  # no "ema" entry, as before --ema existed
    state = load_checkpoint(tmp_path / "old.pt")
    assert "ema" not in state
    # Resumed with --ema: the weights are the file's, the average starts there (warm-up again).
    clf = small_classifier(seed=2, ema=0.9)
    clf.load_state_dict(state)
    assert clf.average.updates == 0 and clf.epoch == 0
    for name, t in plain.model.state_dict().items():
        assert torch.equal(clf.model.state_dict()[name], t) and torch.equal(clf.average.weights[name], t.float())
    # ...and the other way round: an averaged checkpoint resumed without --ema trains on from the
    # training weights; loaded for prediction it gives the average.
    averaged = small_classifier(seed=3, ema=0.5)
    averaged.train(synthetic_batches(1, hw=(16, 16), full_masks=False), None, epochs=1)
    off, predictor = small_classifier(seed=4), small_classifier(seed=5)
    off.load_state_dict(averaged.state_dict())
    predictor.load_state_dict(averaged.state_dict(), weights_only=True)
    for name, t in averaged.model.state_dict().items():
        assert torch.equal(off.model.state_dict()[name], t)
        assert torch.equal(predictor.model.state_dict()[name], averaged.average.weights[name].to(t.dtype))


def test_main_with_ema_lovasz_and_coarse_steps_writes_a_valid_submission(tmp_path):
    """`python main.py --ema 0.9 --lovasz 0.5 --coarse-size 64x64 --coarse-share 0.5` end to end on a
    tiny demo set (epoch 1 coarse, epoch 2 on the Lovasz hinge); a bad value is one line."""
    from carvana.data.demo.dataset import write_demo_dataset
    from carvana.submission.validate import expected_names, validate_submission
    from test_pipeline import TINY, run_main

    data = write_demo_dataset(tmp_path / "tiny", seed=3, n_train_cars=2, n_test_cars=1)
    result = run_main(tmp_path, "--data-dir", str(data), "--epochs", "2", "--run-name", "e", "--ema", "0.9",
                      "--lovasz", "0.5", *TINY, "--input-size", "128x128", "--coarse-size", "64x64",
                      "--coarse-share", "0.5")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = validate_submission(tmp_path / "output" / "submit.csv.gz", expected_names(data / "sample_submission.csv"))
    assert report.ok, str(report)
    last = load_checkpoint(tmp_path / "output" / "models" / "e" / "last.pt")
    assert last["ema"]["decay"] == 0.9 and last["hparams"]["ema"] == 0.9 and last["hparams"]["lovasz"] == 0.5
    assert [last["metrics"]["loss_fn"], last["metrics"]["epoch"]] == ["lovasz", 1]
    assert (last["hparams"]["coarse_size"], last["hparams"]["coarse_share"]) == ("64x64", 0.5)
    assert pd.read_csv(tmp_path / "logs/e/metrics.csv")["loss_fn"].tolist() == ["bce+dice@64x64", "lovasz"]
    bad = run_main(tmp_path, "--data-dir", str(data), "--epochs", "1", "--run-name", "bad", "--ema", "1.5", *TINY)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "error: --ema 1.5: expected a decay (e.g. 0.998) in [0, 1); 0 = off"], bad.stderr
