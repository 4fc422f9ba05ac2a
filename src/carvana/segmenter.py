"""The model side of ``python -m carvana.segment``: a checkpoint's network turning photos into probabilities.

:class:`Segmenter` holds the loaded model and the checkpoint's :class:`ModelConfig`; it makes a
photo's network input (:meth:`Segmenter.prepare`: letterbox or stretch, a DCT-reduced decode for
JPEGs, see :mod:`carvana.data.photos`) and runs a batch of them (:meth:`Segmenter.probabilities`),
with the same eval forward as the classifier (:func:`carvana.training.inference.eval_logits`).
carvana.segment reads the photos, batches them and writes the outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from carvana.data.jpeg import decode_scale, decoded_size
from carvana.data.photos import FITS, input_box, is_jpeg_file, read_photo, to_network_input
from carvana.models.registry import ModelConfig, arch_spec
from carvana.submission.fingerprint import weights_digest
from carvana.training.engines import EngineSlot, choose_engine
from carvana.training.inference import cpu_inference_copy, eval_logits
from carvana.training.precision import choose_precision, use_channels_last


class SegmentError(ValueError):
    """A usage error: bad checkpoint, unsupported model, inputs that clash."""


class Segmenter:
    """A loaded model and everything needed to turn photos into probabilities.

    Normalisation comes from the checkpoint's :class:`ModelConfig` (uint8 RGB scale), the
    input size too. On CUDA the forward runs under autocast (bf16 where supported, else fp16) in
    channels_last, as in training; on the CPU through the classifier's inference copy
    (BatchNorm folded, channels_last, bf16 weights where the CPU has native bf16 and ``amp``).
    ``fast_decode``: a JPEG's network input comes from a DCT-reduced decode (see
    :mod:`carvana.data.photos`); False: from the full decode.
    """

    def __init__(self, model: torch.nn.Module, config: ModelConfig, device: str = "auto", threshold: float = 0.5,
                 tta: bool = False, amp: bool = True, fit: str = "letterbox", fast_decode: bool = True,
                 engine: str = "torch") -> None:
        if config.classes != 1:
            raise SegmentError(f"this checkpoint's model has {config.classes} classes; segment writes binary "
                               "masks and cutouts, so it needs a one-class (car / background) model")
        if not 0.0 <= threshold <= 1.0:
            raise SegmentError(f"threshold must be in [0, 1], got {threshold}")
        if fit not in FITS:
            raise SegmentError(f"fit must be one of {FITS}, got {fit!r}")
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        cuda = self.device.type == "cuda"
        # The classifier's choices: precision by device and --amp; the live model's layout as
        # in training (channels_last on CUDA); on the CPU the inference copy, with its own layout.
        precision = choose_precision(self.device, amp).dtype
        self.amp_dtype = precision if cuda else None
        self.memory_format = torch.channels_last if use_channels_last(self.device, True) else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format).eval()
        self.inference = cpu_inference_copy(self.device, precision, channels_last=True)
        self.config, self.threshold, self.tta, self.fit = config, threshold, tta, fit
        self.fast_decode = fast_decode
        self.input_hw = tuple(config.input_size)
        self.margin = int(getattr(arch_spec(config.arch), "output_margin", 0))
        self.mean = torch.tensor(config.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(config.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        # --engine: the whole step (normalisation, TTA, sigmoid) compiled (training/engines.py); the
        # photo's input already holds a valid-convolution net's margin, so the graph pads nothing.
        name = choose_engine(engine, self.device)
        self.engine = None if name == "torch" else EngineSlot(
            name, engine, self.model, config, weights_digest(self.model.state_dict()), amp, 1, pad=False)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits of normalised inputs (the CPU copy, or autocast on CUDA), as the classifier's."""
        return eval_logits(self.model, self.model, x, self.inference, self.device.type, self.amp_dtype)

    def prepare(self, rgb: np.ndarray, path: Path | None = None):
        """A photo -> (uint8 (H, W, 3) network input, the photo's Box in the output grid).

        With the photo's ``path`` and ``fast_decode``, a JPEG is decoded again at the DCT scale
        for its box and the input made from that (same box, exact geometry)."""
        photo_hw = rgb.shape[:2]
        if self.fast_decode and path is not None and is_jpeg_file(path):
            box = input_box(photo_hw, self.input_hw, self.margin, self.fit)
            scale = decode_scale(photo_hw, (box.height, box.width))
            small = read_photo(path, scale) if scale > 1 else None
            if small is not None and small.shape[:2] == decoded_size(photo_hw, scale):  # else PIL could not scale it
                return to_network_input(small, self.input_hw, self.margin, self.fit, photo_hw)
        return to_network_input(rgb, self.input_hw, self.margin, self.fit)

    @torch.no_grad()
    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) inputs -> float32 (B, h, w) car probabilities on the CPU (hflip TTA if set)."""
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device).permute(0, 3, 1, 2)
        compiled = self.engine.compiled(self.tta) if self.engine is not None else None
        if compiled is not None:
            probs = compiled.probabilities(x.contiguous())
        else:
            x = ((x.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)
            probs = torch.sigmoid(self._logits(x))
            if self.tta:  # as in CarvanaClassifier.predict: average with the mirrored prediction
                probs = (probs + torch.sigmoid(self._logits(x.flip(-1))).flip(-1)) / 2
        expected = (self.input_hw[0] - 2 * self.margin, self.input_hw[1] - 2 * self.margin)
        if tuple(probs.shape[-2:]) != expected:
            raise SegmentError(f"{self.config.arch} returned {tuple(probs.shape[-2:])} maps for {self.input_hw} "
                               f"inputs; expected {expected} (output margin {self.margin})")
        return probs[:, 0].cpu().numpy()
