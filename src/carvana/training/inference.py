"""CPU inference copies of a network: BatchNorm folded into its convolutions, weights in bf16,
2x2 max-pools computed without indices.

Why: under CPU autocast every forward re-casts each fp32 weight to bf16 and runs each
BatchNorm as a separate pass over its activation map. For inference both are waste: in
eval mode BatchNorm is an affine map per channel that folds exactly into the preceding
convolution's weight and bias, and the weights can be cast once; max_pool2d also computes
indices that only a backward pass needs (``MaxPool2x2`` gives the same values). On the
project's 2-core Xeon (AMX-bf16), UNet1024 width 0.25 inference runs at 1.26x fp32's rate
under autocast and at 2.31-2.44x through this copy at 128x192, batch 4; 1.49x and
2.91-2.94x at 256x384 (bench/README.md, bench/cpu_amp.py). Results differ from autocast by
bf16 rounding only.

The copy is made from the live model and brought up to date whenever one of its parameters
or buffers changed (torch's in-place version counters move with every optimiser step,
``copy_`` and ``load_state_dict``), so it is never stale: refreshed in place where the
model's layout is the same, rebuilt where it is not. Checkpoints are always written from
the fp32 model; nothing here touches it. :func:`eval_logits` is the one eval forward: through
the copy on the CPU, under autocast elsewhere.
"""

from __future__ import annotations

import copy
import itertools
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights

from carvana.training.precision import autocast_context, use_channels_last


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


def _fold(model: nn.Module) -> tuple[nn.Module, list[tuple[str, str, str]]]:
    """``fold_batchnorm``'s work; also returns where it folded: (module path, conv, bn) names."""
    folded = copy.deepcopy(model).eval()
    where = []
    for path, module in list(folded.named_modules()):
        for conv_name, bn_name in _foldable_pairs(module):
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            if type(conv) is not nn.Conv2d or type(bn) is not nn.BatchNorm2d or not bn.track_running_stats:
                continue
            setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(module, bn_name, nn.Identity())
            where.append((path, conv_name, bn_name))
    return folded, where


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """An eval-mode deep copy of ``model`` with each foldable BatchNorm2d merged into its
    convolution (and replaced by ``nn.Identity``); returns (copy, number of BatchNorms folded).

    BatchNorms that cannot be proven to follow a convolution directly stay as they are.
    """
    folded, where = _fold(model)
    return folded, len(where)


class MaxPool2x2(nn.Module):
    """``nn.MaxPool2d(2, 2)`` as the elementwise maximum of the four 2x2 phases (strided views).

    The same values: max is exact, NaN propagates in both, odd trailing rows and columns are
    dropped as max_pool2d's floor mode does. Eval only (its gradient splits ties, max_pool2d's
    does not). max_pool2d also computes indices; on the 2-core Xeon this is ~9x faster on a
    full-resolution 6-channel bf16 map and 1.3-2x on the smaller ones, and pooling had taken
    ~13% of UNet1024 width 0.25's bf16 inference time at 128x192.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] < 2 or x.shape[-1] < 2:
            return nn.functional.max_pool2d(x, 2, 2)  # torch's own error for a map too small to pool
        x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]
        rows = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def _pair(v: int | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def replace_max_pools(model: nn.Module) -> int:
    """Swap every plain ``nn.MaxPool2d(2, 2)`` in ``model`` (an eval copy) for ``MaxPool2x2``;
    returns how many. Pools with padding, dilation, ceil mode or indices are left alone."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if (type(child) is nn.MaxPool2d and _pair(child.kernel_size) == (2, 2) and _pair(child.stride) == (2, 2)
                    and _pair(child.padding) == (0, 0) and _pair(child.dilation) == (1, 1)
                    and not child.ceil_mode and not child.return_indices):
                setattr(module, name, MaxPool2x2())
                count += 1
    return count


def weights_stamp(model: nn.Module) -> tuple:
    """Identity and in-place version of every parameter and buffer: changes whenever the
    weights do (an optimiser step, ``load_state_dict``, a ``.to()`` that moves them)."""
    return tuple((t.data_ptr(), t._version) for t in itertools.chain(model.parameters(), model.buffers()))


def _structure(model: nn.Module) -> tuple:
    """What the copy's layout depends on: module names and types, tensor names, shapes, dtypes."""
    return (tuple((name, type(m)) for name, m in model.named_modules()),
            tuple((name, t.shape, t.dtype) for name, t in itertools.chain(model.named_parameters(),
                                                                           model.named_buffers())))


def _prefix(path: str, name: str) -> str:
    return f"{path}.{name}." if path else f"{name}."


class InferenceCopy:
    """A cached, folded, cast copy of a model for eval-mode forwards on the CPU.

    ``dtype`` is the precision the copy runs in (bf16 where the CPU has it natively and
    ``--amp`` is on, else fp32); inputs are cast to it and outputs back to fp32 by the caller.
    When the weights change but the model's layout does not (every optimiser step between
    two validations), the copy's tensors are refreshed in place, the folds recomputed with
    the same ``fuse_conv_bn_weights`` as the first build (bit-identical to a new copy): ~4 ms
    for UNet1024 width 0.25 instead of ~22 ms for a new deep copy, fold and cast, which
    mattered at small inputs and short validation sets.
    """

    def __init__(self, dtype: torch.dtype | None, memory_format: torch.memory_format) -> None:
        self.dtype = dtype or torch.float32
        self.memory_format = memory_format
        self._net: nn.Module | None = None
        self._stamp: tuple | None = None
        self._structure: tuple | None = None
        self._folds: list[tuple[str, str, str, nn.Conv2d]] = []  # (path, conv, bn, the copy's conv)
        self._plain: list[tuple[str, torch.Tensor]] = []  # the copy's other tensors, by live name
        self._fixed = 0  # > 0 inside fixed_weights(): get() skips the per-call weights check

    def _build(self, model: nn.Module) -> None:
        folded, where = _fold(model)
        replace_max_pools(folded)
        self._net = folded.to(dtype=self.dtype, memory_format=self.memory_format)
        for p in self._net.parameters():
            p.grad = None  # no training gradients in an inference copy
            p.requires_grad_(False)
        self._folds = [(path, c, b, self._net.get_submodule(path).get_submodule(c)) for path, c, b in where]
        fused = tuple(_prefix(path, c) for path, c, _ in where)
        self._plain = [(name, t) for name, t in itertools.chain(self._net.named_parameters(), self._net.named_buffers())
                       if not name.startswith(fused)]

    @torch.no_grad()
    def _refresh(self, model: nn.Module) -> None:
        live = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
        for name, dst in self._plain:
            dst.copy_(live[name])  # copy_ casts to the copy's dtype and keeps its memory format
        for path, conv_name, bn_name, dst in self._folds:
            owner = model.get_submodule(path)
            conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
            weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                bn.eps, bn.weight, bn.bias)
            dst.weight.copy_(weight)
            dst.bias.copy_(bias)

    def get(self, model: nn.Module) -> nn.Module:
        """The copy of ``model``'s current weights (refreshed only when they changed)."""
        if self._fixed and self._net is not None:
            return self._net
        stamp = weights_stamp(model)
        if self._net is not None and stamp == self._stamp:
            return self._net
        structure = _structure(model)
        if self._net is None or structure != self._structure:
            self._build(model)
            self._structure = structure
        else:
            self._refresh(model)
        self._stamp = stamp
        return self._net

    @contextmanager
    def fixed_weights(self, model: nn.Module) -> Iterator[None]:
        """Inside, ``model``'s weights are taken as fixed (a validation or prediction loop):
        checked once on entry instead of on every forward. Walking the model's tensors for
        the check costs ~0.3 ms, ~3% of a UNet1024 width 0.25 forward at 128x192, batch 4."""
        self.get(model)
        self._fixed += 1
        try:
            yield
        finally:
            self._fixed -= 1

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


def eval_logits(net: nn.Module, model: nn.Module, images: torch.Tensor, inference: InferenceCopy | None,
                device_type: str, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """fp32 logits of a network in eval mode: what validation, prediction and ``segment`` run.

    Through ``inference`` (the CPU copy of ``model``, see :func:`cpu_inference_copy`) where there
    is one; else ``net`` (``model`` itself, or its compiled form) under ``device_type`` autocast to
    ``amp_dtype`` (none for None). CarvanaClassifier.eval_forward and carvana.segment both call this.
    """
    if inference is not None:
        return inference.forward(model, images)
    with autocast_context(device_type, amp_dtype):
        return net(images).float()
