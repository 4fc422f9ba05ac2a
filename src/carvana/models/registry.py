"""One place that builds any network from a config (segmentation-models-pytorch style).

A :class:`ModelConfig` is everything needed to rebuild a network exactly: architecture,
width, classes, the input size it was trained at, encoder, and the normalisation its
inputs expect. Checkpoints store it (``ModelConfig.to_dict``), so a checkpoint rebuilds
its own model whatever the current settings say.

Each architecture registers an :class:`ArchSpec` that declares what the data path needs
from it: the input-size multiple, the normalisation, and the output margin (how many
pixels a valid-convolution net loses on each side; 0 for same-padded nets).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable

from torch import nn

# ImageNet statistics on the 0..255 scale: what pretrained encoders expect, and a
# harmless standard for networks trained from scratch.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class ModelConfigError(ValueError):
    """A model config that names an unknown architecture or an impossible setting."""


@dataclass(frozen=True)
class ModelConfig:
    """How to build a network; stored in every checkpoint."""

    arch: str = "unet1024"
    width: float = 1.0  # channel multiplier (scratch networks)
    classes: int = 1  # 1 = binary (sigmoid); N >= 2 = one logit map per class (softmax)
    input_size: tuple[int, int] = (1024, 1024)  # (H, W) fed to the network (valid-conv nets: output + 2 * margin)
    encoder: str = ""  # encoder name for encoder-decoder networks; "" for scratch networks
    encoder_weights: str = "none"  # what the encoder started from (informational once trained)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per-channel, uint8 RGB scale
    std: tuple[float, float, float] = IMAGENET_STD
    extra: dict[str, Any] = field(default_factory=dict)  # architecture-specific settings

    def to_dict(self) -> dict[str, Any]:
        """Plain lists/numbers/strings: safe for ``torch.load(weights_only=True)`` and JSON."""
        d = asdict(self)
        d["input_size"], d["mean"], d["std"] = list(self.input_size), list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelConfigError(f"model config has unknown keys {unknown}: written by a newer version?")
        d = dict(data)
        for key in ("input_size", "mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def describe(self) -> str:
        enc = f"+{self.encoder}" if self.encoder else f" width {self.width:g}"
        return f"{self.arch}{enc}, {self.classes} class(es), input {self.input_size[0]}x{self.input_size[1]}"


@dataclass(frozen=True)
class ArchSpec:
    """What an architecture needs from the rest of the pipeline."""

    build: Callable[[ModelConfig], nn.Module]
    size_multiple: int  # input H and W must be multiples of this
    pretrained_encoder: bool = False  # takes --encoder / --encoder-weights
    output_margin: int = 0  # pixels lost per side by valid convolutions (input = output + 2 * margin)
    check_size: Callable[[int, int], None] | None = None  # on the OUTPUT size; raises ValueError naming valid ones
    # (mean, std) on the 0..255 scale for an encoder name; None = ImageNet's
    normalization: Callable[[str], tuple[tuple[float, ...], tuple[float, ...]]] | None = None


_ARCHS: dict[str, ArchSpec] = {}


def register_arch(name: str, spec: ArchSpec) -> None:
    """Make ``name`` buildable by :func:`build_model`."""
    _ARCHS[name] = spec


def arch_names() -> list[str]:
    _register_builtin()
    return sorted(_ARCHS)


def arch_spec(name: str) -> ArchSpec:
    """The spec of ``name``; a clear error listing the known names otherwise."""
    _register_builtin()
    try:
        return _ARCHS[name]
    except KeyError:
        raise ModelConfigError(f"unknown architecture {name!r}; known: {', '.join(arch_names())}") from None


def check_input_size(config: ModelConfig) -> None:
    """Raise ``ValueError`` (naming the nearest valid sizes) if the net cannot take the input size."""
    spec = arch_spec(config.arch)
    h, w = output_size(config)
    if spec.check_size is not None:
        try:
            spec.check_size(h, w)
        except ValueError as exc:
            raise ModelConfigError(str(exc)) from None
        return
    m = spec.size_multiple
    if h > 0 and w > 0 and h % m == 0 and w % m == 0:
        return

    def near(n: int) -> str:
        lower = n // m * m
        return f"{lower} or {lower + m}" if lower > 0 else f"{m}"

    raise ModelConfigError(f"input size {h}x{w} (HxW) is not supported by {config.arch}: height and width must be "
                     f"positive multiples of {m}; nearest valid height: {near(h)}, nearest valid width: {near(w)}")


def parse_size(text: str) -> tuple[int, int]:
    """``"256x384"`` (height x width) -> ``(256, 384)``; one number is a square. The
    architecture checks the values (:func:`check_input_size`)."""
    parts = text.strip().lower().split("x")
    parts = parts * 2 if len(parts) == 1 else parts
    try:
        h, w = (int(p.strip()) for p in parts)
    except ValueError:
        raise ModelConfigError(f"input size {text!r}: expected 'HxW' with integers, such as '256x384'") from None
    return h, w


def at_size(config: ModelConfig, size: tuple[int, int]) -> ModelConfig:
    """The same network predicting images of data size ``size`` (a valid-convolution net's input
    adds its margin); a ModelConfigError when the architecture's size rule refuses it."""
    m = arch_spec(config.arch).output_margin
    moved = replace(config, input_size=(int(size[0]) + 2 * m, int(size[1]) + 2 * m))
    check_input_size(moved)
    return moved


def output_size(config: ModelConfig) -> tuple[int, int]:
    """(H, W) of the network's output: the input less the valid-convolution margin on each side.
    Images and masks are resized to this; the classifier mirror-pads images by the margin."""
    m = arch_spec(config.arch).output_margin
    return config.input_size[0] - 2 * m, config.input_size[1] - 2 * m


def make_config(arch: str, width: float = 1.0, classes: int = 1, size: tuple[int, int] = (1024, 1024),
                encoder: str = "", encoder_weights: str = "none") -> ModelConfig:
    """A checked ModelConfig from the command line's settings: ``size`` is --input-size, the
    network's OUTPUT size (= its input size, except for valid-convolution nets such as
    unet-original, whose input is ``size`` + 2 * output_margin). Normalisation comes from the
    architecture (and encoder); ``encoder``/``encoder_weights`` are dropped for scratch networks."""
    spec = arch_spec(arch)
    if not spec.pretrained_encoder:
        encoder, encoder_weights = "", "none"
    elif not encoder:
        raise ModelConfigError(f"--arch {arch} needs an --encoder (e.g. resnet34, vgg11, mobilenet_v2)")
    mean, std = spec.normalization(encoder) if spec.normalization else (IMAGENET_MEAN, IMAGENET_STD)
    m = spec.output_margin
    config = ModelConfig(arch=arch, width=width, classes=classes, input_size=(size[0] + 2 * m, size[1] + 2 * m),
                         encoder=encoder,
                         encoder_weights=encoder_weights or "none", mean=tuple(mean), std=tuple(std))
    check_input_size(config)
    return config


def encoder_of(model: nn.Module, config: ModelConfig) -> nn.Module | None:
    """The pretrainable encoder of ``model`` (smp's ``model.encoder``); None for scratch networks."""
    return getattr(model, "encoder", None) if arch_spec(config.arch).pretrained_encoder else None


def build_model(config: ModelConfig, pretrained: bool = True) -> nn.Module:
    """Build the network ``config`` describes (randomly initialised, or with its encoder weights).

    ``pretrained=False`` skips the encoder weights: for weights about to be overwritten by a
    checkpoint, which must not need a download."""
    if not pretrained:
        config = replace(config, encoder_weights="none")
    if config.classes < 1:
        raise ModelConfigError(f"classes must be >= 1, got {config.classes}")
    spec = arch_spec(config.arch)
    check_input_size(config)
    return spec.build(config)


def _build_unet1024(config: ModelConfig) -> nn.Module:
    from carvana.models.unet1024 import UNet1024

    return UNet1024(width=config.width, classes=config.classes)


def _build_unet_original(config: ModelConfig) -> nn.Module:
    from carvana.models.unet_original import UNetOriginal

    return UNetOriginal(width=config.width, classes=config.classes)


def _smp_builder(arch: str) -> Callable[[ModelConfig], nn.Module]:
    def build(config: ModelConfig) -> nn.Module:
        from carvana.models.smp_nets import build_smp

        return build_smp(arch, config.encoder, config.encoder_weights, config.classes)

    return build


def _smp_normalization(encoder: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from carvana.models.smp_nets import normalization

    return normalization(encoder)


def _register_builtin() -> None:
    """Register the architectures this package ships (idempotent; smp is imported on first build)."""
    if "unet1024" in _ARCHS:
        return
    from carvana.models import smp_nets, unet_original
    from carvana.models.unet1024 import SIZE_MULTIPLE, check_input_size as unet1024_check

    register_arch("unet1024", ArchSpec(build=_build_unet1024, size_multiple=SIZE_MULTIPLE, check_size=unet1024_check))
    # --input-size is the OUTPUT size here; images are mirror-padded by the margin on the way in.
    register_arch("unet-original", ArchSpec(build=_build_unet_original, size_multiple=unet_original.SIZE_STEP,
                                            output_margin=unet_original.MARGIN,
                                            check_size=unet_original.check_output_size))
    for name in smp_nets.SMP_ARCHS:
        register_arch(name, ArchSpec(build=_smp_builder(name), size_multiple=smp_nets.SIZE_MULTIPLE,
                                     pretrained_encoder=True, normalization=_smp_normalization))
