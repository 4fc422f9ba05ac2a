"""build_model(config) and checkpoints that describe their model."""

from __future__ import annotations

import pytest
import torch

from carvana.models.registry import ModelConfig, ModelConfigError, arch_spec, build_model, check_input_size
from carvana.models.unet1024 import UNet1024
from carvana.training.checkpoint import (CheckpointError, load_checkpoint, load_model, model_config_of,
                                         save_checkpoint)


def test_build_unet1024_from_config_matches_direct_construction():
    config = ModelConfig(arch="unet1024", width=0.125, classes=3, input_size=(64, 128))
    model = build_model(config)
    assert isinstance(model, UNet1024)
    direct = UNet1024(width=0.125, classes=3)
    assert [p.shape for p in model.parameters()] == [p.shape for p in direct.parameters()]
    assert model(torch.zeros(1, 3, 64, 128)).shape == (1, 3, 64, 128)


def test_config_round_trips_through_a_plain_dict():
    config = ModelConfig(arch="unet1024", width=0.5, classes=2, input_size=(256, 384), extra={"k": 1})
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ModelConfigError, match="unknown keys.*bogus"):
        ModelConfig.from_dict({**config.to_dict(), "bogus": 1})


def test_unknown_arch_and_bad_size_are_clear_errors():
    with pytest.raises(ModelConfigError, match="unknown architecture 'nope'.*unet1024"):
        build_model(ModelConfig(arch="nope"))
    with pytest.raises(ValueError, match="nearest valid height: 64 or 128"):
        check_input_size(ModelConfig(input_size=(100, 128)))
    assert arch_spec("unet1024").size_multiple == 64


def test_checkpoint_rebuilds_its_own_model(tmp_path):
    config = ModelConfig(arch="unet1024", width=0.125, classes=1, input_size=(64, 64))
    model = build_model(config)
    path = tmp_path / "m.pt"
    save_checkpoint({"model": model.state_dict(), "model_config": config.to_dict()}, path)
    rebuilt, got, state = load_model(path)
    assert got == config and state["format_version"] == 2
    for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()):
        assert torch.equal(a, b)


def test_format_1_checkpoint_config_comes_from_its_hparams(tmp_path):
    model = UNet1024(width=0.125)
    path = tmp_path / "old.pt"
    torch.save({"format_version": 1, "model": model.state_dict(),
                "hparams": {"width": 0.125, "input_size": "128x192"}}, path)
    rebuilt, config, _ = load_model(path)
    assert config == ModelConfig(arch="unet1024", width=0.125, classes=1, input_size=(128, 192))
    assert isinstance(rebuilt, UNet1024)


def test_weights_of_another_width_give_a_clear_error(tmp_path):
    path = tmp_path / "w.pt"
    wrong = ModelConfig(arch="unet1024", width=0.25, input_size=(64, 64))
    save_checkpoint({"model": build_model(ModelConfig(width=0.125, input_size=(64, 64))).state_dict(),
                     "model_config": wrong.to_dict()}, path)  # config lies about the weights
    with pytest.raises(CheckpointError, match=r"w\.pt: holds unet1024 width 0.25.*do not fit"):
        load_model(path)
    assert model_config_of(load_checkpoint(path), path) == wrong
