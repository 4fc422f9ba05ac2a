"""Encoder-decoder networks from segmentation-models-pytorch (smp), and their encoder weights.

``--arch linknet --encoder resnet34`` is LinkNet34, ``--arch unet --encoder vgg11`` is
TernausNet, ``--arch unet --encoder mobilenet_v2`` the TensorFlow tutorials' MobileNetV2-UNet.
smp builds the network; this module adds what smp leaves to the caller:

* ``--encoder-weights imagenet`` goes through smp's own source (its Hugging Face Hub repo
  and revision for the encoder) into the usual Hugging Face cache, but is resolved up front
  by :func:`resolve_encoder_weights`, which fails within seconds with one clear message when
  the network is unreachable (smp itself retries for ~25 s and then raises a URLError).
* ``--encoder-weights PATH`` loads a local state-dict file (``torch.save(encoder.state_dict())``
  or a .safetensors file) strictly into the encoder, with ``weights_only=True``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

# smp architectures offered by --arch (all take any input whose sides are multiples of 32).
SMP_ARCHS = ("unet", "unetplusplus", "manet", "linknet", "fpn", "pspnet", "deeplabv3", "deeplabv3plus", "pan",
             "upernet")
SIZE_MULTIPLE = 32  # five stride-2 stages in the encoders
PROBE_TIMEOUT_S = 5.0


class EncoderWeightsError(ValueError):
    """Encoder weights that cannot be had: offline, unknown, or a file that does not fit."""


def _offline_message(encoder: str, reason: str) -> str:
    return (f"--encoder-weights imagenet: cannot download the ImageNet weights of encoder {encoder!r} ({reason}). "
            "They are fetched once into the Hugging Face cache and need network access on first use. Without it, "
            "use --encoder-weights PATH (a local state-dict file of the encoder, e.g. saved with "
            "torch.save(model.encoder.state_dict(), PATH) on a machine that has them) or --encoder-weights none "
            "(train from scratch).")


def _smp_settings(encoder: str) -> dict | None:
    """smp's pretrained settings of a native encoder (repo_id, revision, mean, std...); None for tu- encoders."""
    from segmentation_models_pytorch.encoders import encoders

    if encoder.startswith("tu-"):
        return None
    if encoder not in encoders:
        raise EncoderWeightsError(f"unknown encoder {encoder!r}; smp encoders include resnet34, vgg11, mobilenet_v2, "
                                  "efficientnet-b0, tu-<any timm model>")
    settings = encoders[encoder]["pretrained_settings"]
    if "imagenet" not in settings:
        raise EncoderWeightsError(f"encoder {encoder!r} has no 'imagenet' weights in smp (it has: "
                                  f"{', '.join(settings) or 'none'}); use --encoder-weights PATH or none")
    return settings["imagenet"]


def _hub_reachable() -> str:
    """'' if the Hugging Face Hub answers a TCP connect within PROBE_TIMEOUT_S, else why not."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"{host}:{port} unreachable: {exc.strerror or exc}"
    return ""


def resolve_encoder_weights(encoder: str, weights: str) -> str | None:
    """Make ``weights`` usable now: None for 'none', the cached file for 'imagenet' (downloaded
    once if needed), PATH for a file that exists. Raises :class:`EncoderWeightsError` otherwise."""
    if weights in ("", "none"):
        return None
    if weights != "imagenet":
        if not Path(weights).is_file():
            raise EncoderWeightsError(f"--encoder-weights {weights}: no such file (expected 'imagenet', 'none' or "
                                      "the path of an encoder state-dict file)")
        return weights
    settings = _smp_settings(encoder)
    if settings is None:  # timm encoders: timm downloads them; only check we can reach the network
        reason = _hub_reachable()
        if reason:
            raise EncoderWeightsError(_offline_message(encoder, reason))
        return "imagenet"
    from huggingface_hub import hf_hub_download

    repo, rev = settings["repo_id"], settings["revision"]
    try:  # cached already: no network needed
        return hf_hub_download(repo, "model.safetensors", revision=rev, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure here just means "not cached"
        pass
    reason = _hub_reachable()
    if reason:
        raise EncoderWeightsError(_offline_message(encoder, reason))
    try:
        hf_hub_download(repo, "config.json", revision=rev)
        return hf_hub_download(repo, "model.safetensors", revision=rev)
    except Exception as exc:  # noqa: BLE001 - network and hub errors come in many types
        raise EncoderWeightsError(_offline_message(encoder, f"{type(exc).__name__}: {str(exc)[:200]}")) from None


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> None:
    """Load a state-dict file into ``encoder`` strictly; a clear error names missing/unexpected keys."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch/safetensors raise several types for bad files
        raise EncoderWeightsError(f"{path}: not a loadable state-dict file ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderWeightsError(f"{path}: expected an encoder state dict (parameter name -> tensor)")
    ours = encoder.state_dict()
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    if missing or unexpected:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "") if keys else "none"

        raise EncoderWeightsError(f"{path}: does not fit this encoder: missing keys: {show(missing)}; "
                                  f"unexpected keys: {show(unexpected)}")
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items() if state[k].shape != v.shape]
    if wrong:
        raise EncoderWeightsError(f"{path}: shapes do not fit this encoder (file vs model): {'; '.join(wrong[:5])}")
    encoder.load_state_dict(state, strict=True)


def build_smp(arch: str, encoder: str, weights: str, classes: int) -> nn.Module:
    """An smp network with its encoder initialised from ``weights`` ('none', 'imagenet' or PATH)."""
    import segmentation_models_pytorch as smp

    resolved = resolve_encoder_weights(encoder, weights) if weights not in ("", "none") else None
    timm_imagenet = resolved == "imagenet"  # tu- encoders: timm loads them itself
    try:
        model = smp.create_model(arch, encoder_name=encoder, encoder_weights="imagenet" if timm_imagenet else None,
                                 in_channels=3, classes=classes)
    except KeyError as exc:  # smp's message lists the valid names
        raise EncoderWeightsError(str(exc).strip("\"'")) from None
    if resolved and not timm_imagenet:
        load_encoder_weights(model.encoder, resolved)
    return model


def normalization(encoder: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) on the 0..255 scale the encoder's ImageNet weights expect (ImageNet's
    own statistics unless smp records others), read from smp's local table: no download."""
    from segmentation_models_pytorch.encoders import pretrained_settings

    s = pretrained_settings.get(encoder, {}).get("imagenet", {})
    mean, std = s.get("mean", (0.485, 0.456, 0.406)), s.get("std", (0.229, 0.224, 0.225))
    scale = 255.0 if list(s.get("input_range", [0, 1]))[-1] == 1 else 1.0
    return tuple(float(m) * scale for m in mean), tuple(float(v) * scale for v in std)
