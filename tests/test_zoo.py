"""The model zoo: smp encoder nets, UNetOriginal, encoder weights, freezing, time budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from carvana.data.datasets import resize_mask
from carvana.models import smp_nets
from carvana.models.registry import (IMAGENET_MEAN, ModelConfig, ModelConfigError, arch_names, arch_spec, build_model,
                                     make_config, output_size)
from carvana.models.smp_nets import EncoderWeightsError, load_encoder_weights, resolve_encoder_weights
from carvana.models.unet_original import MARGIN, UNetOriginal, center_crop, check_output_size, mirror_pad
from carvana.training.checkpoint import load_model, save_checkpoint
from carvana.training.classifier import CarvanaClassifier
from conftest import synthetic_batches

RECIPES = {"linknet34": ("linknet", "resnet34"), "ternausnet": ("unet", "vgg11"),
           "mobilenetv2-unet": ("unet", "mobilenet_v2")}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_named_recipes_build_and_keep_the_input_size(recipe):
    arch, encoder = RECIPES[recipe]
    config = make_config(arch, classes=1, size=(64, 96), encoder=encoder, encoder_weights="none")
    model = build_model(config).eval()
    assert type(model).__name__ == {"linknet": "Linknet", "unet": "Unet"}[arch]
    assert type(model.encoder).__name__ == {"resnet34": "ResNetEncoder", "vgg11": "VGGEncoder",
                                            "mobilenet_v2": "MobileNetV2Encoder"}[encoder]
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 96)).shape == (1, 1, 64, 96)
    assert config.mean == pytest.approx(IMAGENET_MEAN) and arch_spec(arch).size_multiple == 32


def test_every_registered_arch_is_listed_and_smp_sizes_are_checked():
    assert {"unet1024", "unet-original", "unet", "linknet", "fpn", "unetplusplus"} <= set(arch_names())
    with pytest.raises(ModelConfigError, match=r"multiples of 32; nearest valid height: 96 or 128"):
        make_config("fpn", size=(100, 128), encoder="resnet34")
    with pytest.raises(ModelConfigError, match="needs an --encoder"):
        make_config("linknet", size=(64, 64), encoder="")
    with pytest.raises(EncoderWeightsError, match="unknown encoder 'resnet35'"):
        resolve_encoder_weights("resnet35", "imagenet")
    # scratch networks drop encoder settings, so their checkpoints do not claim an encoder
    assert make_config("unet1024", size=(64, 64), encoder="resnet34", encoder_weights="imagenet").encoder == ""


def test_unet_original_is_the_2015_network():
    full = UNetOriginal(width=1.0)
    assert sum(p.numel() for p in full.parameters()) == pytest.approx(31.0e6, rel=0.02)  # the paper's ~31M
    small = UNetOriginal(width=0.0625).eval()
    with torch.no_grad():
        assert small(torch.zeros(1, 3, 572, 572)).shape == (1, 1, 388, 388)  # the paper's tile
        assert small(torch.zeros(1, 3, 36 + 2 * MARGIN, 52 + 2 * MARGIN)).shape == (1, 1, 36, 52)
    widths = sorted({m.out_channels for m in full.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)})
    assert widths == [64, 128, 256, 512, 1024]
    assert all(m.padding == (0, 0) for m in full.modules() if isinstance(m, nn.Conv2d))  # valid convolutions


def test_unet_original_size_errors_name_the_nearest_valid_sizes():
    check_output_size(388, 388)
    with pytest.raises(ValueError, match=r"nearest valid height: 52 or 68, nearest valid width: 372 or 388"):
        check_output_size(64, 380)
    config = make_config("unet-original", size=(388, 388))  # --input-size is the OUTPUT size
    assert config.input_size == (572, 572) and output_size(config) == (388, 388)
    with pytest.raises(ModelConfigError, match="OUTPUT size for unet-original"):
        make_config("unet-original", size=(128, 192))
    with pytest.raises(ValueError, match="nearest valid height: 4,"):
        check_output_size(2, 388)


def _linearised(model: nn.Module) -> nn.Module:
    """Same geometry, no data-dependent gates: ReLU -> identity, max -> average pooling,
    positive weights (no cancellation): an input pixel reaches an output pixel iff it is
    inside its receptive field."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                setattr(module, name, nn.AvgPool2d(2))
    with torch.no_grad():
        for p in model.parameters():
            p.abs_()
    return model.eval().double()


def _receptive_box(model: nn.Module, x: torch.Tensor, i: int, j: int) -> tuple[list[int], list[int]]:
    x = x.clone().requires_grad_(True)
    model(x)[0, 0, i, j].backward()
    reached = (x.grad.abs().sum(1)[0] > 0).nonzero()
    return reached.min(0).values.tolist(), reached.max(0).values.tolist()


def test_unet_original_output_pixel_sits_over_input_pixel_plus_margin():
    """The crop geometry: output (i, j) is centred on padded-input (i + 92, j + 92)."""
    torch.manual_seed(0)
    model = _linearised(UNetOriginal(width=0.0625))
    x = torch.zeros(1, 3, 36 + 2 * MARGIN, 52 + 2 * MARGIN, dtype=torch.double)
    for i, j in [(0, 0), (7, 30), (35, 51)]:
        low, high = _receptive_box(model, x, i, j)  # all levels: contains the pixel
        assert low[0] <= i + MARGIN <= high[0] and low[1] <= j + MARGIN <= high[1]
    with torch.no_grad():  # keep only the full-resolution skip path: a 9x9 window exactly centred
        model.up[-1].weight.zero_()
        model.up[-1].bias.zero_()
    for i, j in [(0, 0), (7, 30), (35, 51)]:
        low, high = _receptive_box(model, x, i, j)
        assert low == [i + MARGIN - 4, j + MARGIN - 4] and high == [i + MARGIN + 4, j + MARGIN + 4]


def test_mask_resize_mirror_pad_and_crop_land_on_the_same_pixels():
    """mask (1280x1918) -> resize to the output size -> as an image through the classifier's
    input path (normalise + mirror pad) -> the output-aligned window -> the same mask."""
    yy, xx = np.mgrid[:1280, :1918]
    full = (((xx - 900) / 700.0) ** 2 + ((yy - 700) / 400.0) ** 2 < 1).astype(np.uint8)
    out_hw = (52, 84)
    mask = resize_mask(full, out_hw)
    config = make_config("unet-original", width=0.0625, size=out_hw)
    clf = CarvanaClassifier(build_model(config), epochs=1, device="cpu", progress=False, model_config=config)
    image = torch.from_numpy(np.repeat(mask[None] * 255, 3, 0))[None]  # uint8 (1, 3, H, W)
    x = clf._images_to_device(image)
    assert x.shape == (1, 3, out_hw[0] + 2 * MARGIN, out_hw[1] + 2 * MARGIN)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    back = center_crop(x, out_hw) * std + torch.tensor(config.mean).view(1, 3, 1, 1)
    assert np.array_equal((back[0, 0] > 127).numpy().astype(np.uint8), mask)
    # the border is the mirror image (edge not repeated), also when the margin exceeds the side
    assert torch.equal(x[..., MARGIN - 5, MARGIN:-MARGIN], x[..., MARGIN + 5, MARGIN:-MARGIN])
    assert mirror_pad(torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4), 5)[0, 0, 0].tolist() == \
        [1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2]
    with torch.no_grad():
        assert clf.model.eval()(x).shape[-2:] == out_hw


def test_normalisation_comes_from_the_model_config():
    config = ModelConfig(arch="unet1024", width=0.125, input_size=(64, 64), mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 5.0))
    clf = CarvanaClassifier(build_model(config), epochs=1, device="cpu", progress=False, model_config=config)
    x = clf._images_to_device(torch.full((1, 3, 64, 64), 50, dtype=torch.uint8))
    assert x[0, :, 0, 0].tolist() == [20.0, 7.5, 4.0]


def _encoder_file(tmp_path, encoder: str = "resnet34", seed: int = 1):
    torch.manual_seed(seed)
    source = build_model(make_config("linknet", size=(64, 64), encoder=encoder))
    path = tmp_path / f"{encoder}.pt"
    torch.save(source.encoder.state_dict(), path)
    return path, source.encoder.state_dict()


def test_local_encoder_weights_load_exactly(tmp_path):
    path, saved = _encoder_file(tmp_path)
    config = make_config("linknet", size=(64, 64), encoder="resnet34", encoder_weights=str(path))
    model = build_model(config)
    got = model.encoder.state_dict()
    assert got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved)
    # safetensors (the format of smp's own cache) loads the same way
    from safetensors.torch import save_file

    st = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in saved.items()}, str(st))
    again = build_model(make_config("unet", size=(64, 64), encoder="resnet34", encoder_weights=str(st)))
    assert all(torch.equal(again.encoder.state_dict()[k], saved[k]) for k in saved)


def test_wrong_encoder_file_lists_missing_and_unexpected_keys(tmp_path):
    path, _ = _encoder_file(tmp_path, "mobilenet_v2")
    with pytest.raises(EncoderWeightsError, match=r"mobilenet_v2.pt: does not fit this encoder: missing keys: .*conv1"
                                                   r".*unexpected keys: features"):
        build_model(make_config("linknet", size=(64, 64), encoder="resnet34", encoder_weights=str(path)))
    with pytest.raises(EncoderWeightsError, match="no such file"):
        resolve_encoder_weights("resnet34", str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a state dict")
    with pytest.raises(EncoderWeightsError, match="junk.pt: not a loadable state-dict file"):
        load_encoder_weights(nn.Linear(1, 1), tmp_path / "junk.pt")


def test_imagenet_offline_fails_fast_with_one_clear_message(monkeypatch):
    """No network: the message names both ways out. Nothing is downloaded: the fake hub refuses
    anything but a cache lookup, and the network probe fails."""
    import huggingface_hub

    def fake_download(repo_id, filename, revision=None, local_files_only=False, **kw):
        if not local_files_only:
            pytest.fail("a download was attempted")
        raise FileNotFoundError("not cached")

    def no_network(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(smp_nets.socket, "create_connection", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(EncoderWeightsError) as err:
        build_model(make_config("linknet", size=(64, 64), encoder="resnet34", encoder_weights="imagenet"))
    msg = str(err.value)
    assert "--encoder-weights PATH" in msg and "--encoder-weights none" in msg and "Network is unreachable" in msg
    # a cached file is used without touching the network
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: "/cache/model.safetensors")
    assert resolve_encoder_weights("resnet34", "imagenet") == "/cache/model.safetensors"


def _linknet_classifier(**kwargs) -> CarvanaClassifier:
    torch.manual_seed(0)
    config = make_config("linknet", size=(32, 32), encoder="mobilenet_v2")  # the smallest named encoder
    return CarvanaClassifier(build_model(config), epochs=kwargs.pop("epochs", 2), device="cpu", progress=False,
                             model_config=config, **kwargs)


def test_freeze_encoder_epochs_keeps_the_encoder_then_releases_it():
    clf = _linknet_classifier(freeze_encoder_epochs=1, lr=1e-2)
    enc0 = {k: v.clone() for k, v in clf.model.encoder.state_dict().items()}
    dec0 = {k: v.clone() for k, v in clf.model.decoder.state_dict().items()}
    batches = synthetic_batches(2, batch_size=2, hw=(32, 32), full_masks=False)
    clf.train(batches, None, epochs=1)
    enc1 = clf.model.encoder.state_dict()
    assert all(torch.equal(enc0[k], enc1[k]) for k in enc0)  # weights and BatchNorm statistics
    assert not all(torch.equal(dec0[k], v) for k, v in clf.model.decoder.state_dict().items())
    clf.train(batches, None, epochs=2)
    assert not all(torch.equal(enc0[k], v) for k, v in clf.model.encoder.state_dict().items())
    with pytest.raises(ModelConfigError, match="needs a network with a pretrained encoder"):
        config = make_config("unet1024", width=0.125, size=(64, 64))
        CarvanaClassifier(build_model(config), epochs=1, device="cpu", model_config=config, freeze_encoder_epochs=1)


def _tiny_classifier(**kwargs) -> CarvanaClassifier:
    torch.manual_seed(0)
    config = make_config("unet1024", width=0.125, size=(64, 64))
    return CarvanaClassifier(build_model(config), device="cpu", progress=False, model_config=config, **kwargs)


def test_time_budget_stops_training_and_anneals_the_lr_by_the_clock():
    clf = _tiny_classifier(epochs=5, time_budget=1e-6)
    steps = []
    clf.loss_fn = lambda logits, masks, f=clf.loss_fn: steps.append(1) or f(logits, masks)
    assert len(clf.train(synthetic_batches(3, 2, (64, 64), full_masks=False), None)) == 1
    assert len(steps) == 1  # stopped after the first step, mid-epoch
    clf = _tiny_classifier(epochs=3, time_budget=1e6, lr=1e-3)
    history = clf.train(synthetic_batches(1, 2, (64, 64), full_masks=False), None)
    assert len(history) == 3 and 0 < history[-1]["lr"] < 1e-3 and clf.scheduler is None


def test_checkpoint_rebuilds_the_smp_network_without_downloading(tmp_path, monkeypatch):
    clf = _linknet_classifier()
    # the run started from ImageNet weights; rebuilding must not fetch them again
    clf.model_config = make_config("linknet", size=(32, 32), encoder="mobilenet_v2", encoder_weights="imagenet")
    save_checkpoint(clf.state_dict(), tmp_path / "best.pt")
    monkeypatch.setattr(smp_nets, "resolve_encoder_weights", lambda *a: pytest.fail("weights resolved"))
    model, config, _ = load_model(tmp_path / "best.pt")
    assert type(model).__name__ == "Linknet" and config.encoder == "mobilenet_v2"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), clf.model.state_dict().values()))


def test_no_train_flags_are_checked_against_the_checkpoints_network():
    from carvana.training.checkpoint import CheckpointError, check_settings_match

    config = make_config("unet-original", width=0.0625, size=(52, 52))
    check_settings_match(config, {"arch": "unet-original", "input_size": "52x52", "encoder": "vgg11"}, "c.pt")
    with pytest.raises(CheckpointError, match="--arch linknet contradicts the checkpoint c.pt"):
        check_settings_match(config, {"arch": "linknet"}, "c.pt")
    smp_config = make_config("linknet", size=(64, 64), encoder="resnet34")
    with pytest.raises(CheckpointError, match="--encoder vgg11 contradicts.*--encoder resnet34"):
        check_settings_match(smp_config, {"encoder": "vgg11"}, "c.pt")
