"""CPU inference copies of a network: BatchNorm folded into its convolutions, weights in bf16.

Why: under CPU autocast every forward re-casts each fp32 weight to bf16 and runs each
BatchNorm as a separate pass over its activation map. For inference both are waste: in
eval mode BatchNorm is an affine map per channel that folds exactly into the preceding
convolution's weight and bias, and the weights can be cast once. On the project's 2-core
Xeon (AMX-bf16) that took UNet1024 width 0.25 inference from 1.25x to 1.62x fp32's rate at
128x192 and from 1.37x to 2.09x at 256x384 (bench/README.md, bench/cpu_amp.py). Results
differ from autocast by bf16 rounding only.

The copy is made from the live model and rebuilt whenever one of its parameters or buffers
changed (torch's in-place version counters move with every optimiser step, ``copy_`` and
``load_state_dict``), so it is never stale. Checkpoints are always written from the fp32
model; nothing here touches it.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from carvana.training.precision import use_channels_last


# Library classes whose forward applies bn directly to conv's output (their source says so),
# keyed by module path + class name: torchvision's ResNet blocks and smp's ResNet encoder stem.
KNOWN_FOLDABLE: dict[str, tuple[tuple[str, str], ...]] = {
    "torchvision.models.resnet.BasicBlock": (("conv1", "bn1"), ("conv2", "bn2")),
    "torchvision.models.resnet.Bottleneck": (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    "segmentation_models_pytorch.encoders.resnet.ResNetEncoder": (("conv1", "bn1"),),
}


def _foldable_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """Names of (convolution, BatchNorm) children of ``module`` where the BatchNorm is applied
    directly to that convolution's output, so folding is exact.

    Two sources only, because a module's definition order need not be its forward order:
    neighbours in an ``nn.Sequential`` that keeps Sequential's forward (its order *is* the
    forward order), and pairs a module
    declares in a ``FOLDABLE_CONV_BN`` class attribute (e.g. UNet1024's ConvBnRelu), or that
    ``KNOWN_FOLDABLE`` lists for a library class.
    """
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        children = list(module.named_children())
        return [(a, b) for (a, conv), (b, bn) in zip(children, children[1:])
                if type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d]
    cls = type(module)
    return list(KNOWN_FOLDABLE.get(f"{cls.__module__}.{cls.__qualname__}", getattr(cls, "FOLDABLE_CONV_BN", ())))


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """An eval-mode deep copy of ``model`` with each foldable BatchNorm2d merged into its
    convolution (and replaced by ``nn.Identity``); returns (copy, number of BatchNorms folded).

    BatchNorms that cannot be proven to follow a convolution directly stay as they are.
    """
    folded = copy.deepcopy(model).eval()
    count = 0
    for module in list(folded.modules()):
        for conv_name, bn_name in _foldable_pairs(module):
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            if type(conv) is not nn.Conv2d or type(bn) is not nn.BatchNorm2d or not bn.track_running_stats:
                continue
            setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(module, bn_name, nn.Identity())
            count += 1
    return folded, count


def weights_stamp(model: nn.Module) -> tuple:
    """Identity and in-place version of every parameter and buffer: changes whenever the
    weights do (an optimiser step, ``load_state_dict``, a ``.to()`` that moves them)."""
    return tuple((t.data_ptr(), t._version) for t in itertools.chain(model.parameters(), model.buffers()))


class InferenceCopy:
    """A cached, folded, cast copy of a model for eval-mode forwards on the CPU.

    ``dtype`` is the precision the copy runs in (bf16 where the CPU has it natively and
    ``--amp`` is on, else fp32); inputs are cast to it and outputs back to fp32 by the caller.
    """

    def __init__(self, dtype: torch.dtype | None, memory_format: torch.memory_format) -> None:
        self.dtype = dtype or torch.float32
        self.memory_format = memory_format
        self._net: nn.Module | None = None
        self._stamp: tuple | None = None

    def get(self, model: nn.Module) -> nn.Module:
        """The copy of ``model``'s current weights (rebuilt only when they changed)."""
        stamp = weights_stamp(model)
        if self._net is None or stamp != self._stamp:
            folded, _ = fold_batchnorm(model)
            self._net = folded.to(dtype=self.dtype, memory_format=self.memory_format)
            for p in self._net.parameters():
                p.grad = None  # deepcopy brought the training gradients along
                p.requires_grad_(False)
            self._stamp = stamp
        return self._net

    def forward(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """fp32 logits of ``model`` (eval mode) for fp32 ``images``, through the copy."""
        return self.get(model)(images.to(self.dtype).contiguous(memory_format=self.memory_format)).float()


def cpu_inference_copy(device: torch.device, dtype: torch.dtype | None, channels_last: bool) -> InferenceCopy | None:
    """The eval copy for ``device``: on the CPU an InferenceCopy in ``dtype``, channels_last
    unless ``channels_last`` is off; None elsewhere (CUDA runs the live model under autocast)."""
    if device.type != "cpu":
        return None
    inference_cl = use_channels_last(device, channels_last, inference=True)
    return InferenceCopy(dtype, torch.channels_last if inference_cl else torch.contiguous_format)
