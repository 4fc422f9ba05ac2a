"""The prediction step as one graph for the inference engines (training/engines.py) and ONNX export.

:class:`ProbabilityGraph` takes the loader's uint8 batch and does everything the torch path
(``evaluation.batch_probabilities``) does before post-processing: normalisation, the mirror margin
of valid-convolution nets, the horizontal-flip TTA folded into the same batch, the activation and
the average. :func:`export_graph` writes it as ONNX with a dynamic batch.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from carvana.data.files import atomic_path
from carvana.data.image_tensors import mirror_pad
from carvana.models.registry import ModelConfig, arch_spec
from carvana.models.unet1024 import UNet1024, without_concatenation

OPSET = 17
# The graph's layout: 2 mirrors by Gather and runs UNet1024 without concatenations; 1, the earlier
# graph (``flip``, concatenations), stays for bench/engine.py's A/B. Part of the engines' cache key.
LAYOUT = 2


class ProbabilityGraph(nn.Module):
    """uint8 RGB (N, 3, H, W) -> probabilities (N, classes, h, w): normalisation, mirror margin,
    network, sigmoid (softmax for several classes) and, with ``tta``, the mirrored image in the
    same batch, its map flipped back and averaged in.

    Shaped for the engines (measured per layer with OpenVINO's counters, bench/README.md): the
    mirror is a Gather of the columns in reverse on the uint8 input, where ``flip`` exports as a
    Slice with a negative step that OpenVINO runs with a reference kernel; and a UNet1024
    runs as :func:`~carvana.models.unet1024.without_concatenation`
    (its decoders sum two convolutions instead of concatenating). Both compute the same values.
    ``layout`` 1 is the earlier graph (``flip`` and concatenations), for the benches' A/B."""

    def __init__(self, model: nn.Module, config: ModelConfig, tta: bool = False, pad: bool = True,
                 layout: int | None = None) -> None:
        super().__init__()
        self.layout = LAYOUT if layout is None else layout
        self.model = without_concatenation(model) if self.layout >= 2 and isinstance(model, UNet1024) else model
        self.classes, self.tta = config.classes, tta
        # pad=False: the input already holds the margin (carvana.segment letterboxes it in)
        self.margin = arch_spec(config.arch).output_margin if pad else 0
        self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1))

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.classes == 1 else torch.softmax(logits, dim=1)

    def network(self, image: torch.Tensor) -> torch.Tensor:
        x = (image.float() - self.mean) / self.std
        if self.margin:
            x = mirror_pad(x, self.margin)  # a mirror margin commutes with the horizontal mirror
        return self.activate(self.model(x))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if not self.tta:
            return self.network(image)
        n, mirror = image.shape[0], mirrored if self.layout >= 2 else (lambda x: x.flip(-1))
        p = self.network(torch.cat([image, mirror(image)], 0))
        return (p[:n] + mirror(p[n:])) / 2


def mirrored(x: torch.Tensor) -> torch.Tensor:
    """``x.flip(-1)`` as a Gather of the columns in reverse (see :class:`ProbabilityGraph`). The
    indices are a constant of the exported graph (its width is fixed): ONNX Runtime's extended
    optimisations mis-shaped a Gather fed by a Range computed from the input's shape."""
    width = int(x.shape[-1])  # a Python int while tracing too: the indices export as a constant
    return x.index_select(x.ndim - 1, torch.from_numpy(np.arange(width - 1, -1, -1)).to(x.device))


def export_graph(graph: ProbabilityGraph, input_hw: tuple[int, int], path: Path) -> None:
    """The graph as ONNX (dynamic batch), written atomically."""
    example = torch.zeros((1, 3, *input_hw), dtype=torch.uint8)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's tracer warnings about shape checks
        torch.onnx.export(graph, (example,), str(tmp), input_names=["image"], output_names=["prob"],
                          dynamic_axes={"image": {0: "batch"}, "prob": {0: "batch"}}, opset_version=OPSET,
                          dynamo=False)
