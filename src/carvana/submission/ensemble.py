"""Streaming ensembles: several models' probabilities averaged, then ONE post-processing.

``EnsemblePredictor`` looks like a classifier to the prediction code: ``predict(loader,
callbacks, tta)`` hands each batch's averaged (B, h, w) probabilities to the same
``on_predict_batch_end`` callbacks (the streaming submission saver), so thresholding,
upsampling and RLE encoding happen once per image however many members there are, and
prediction shards under torchrun exactly as for one model.

Members may differ in architecture, width and input size: each is rebuilt from its own
checkpoint (``training.checkpoint.load_model``) and run by its own ``CarvanaClassifier``
(same normalisation, autocast and TTA code as a single-model prediction). The loader
gives every image once per distinct input size, decoded and resized exactly as the
single-model loader does: a JPEG is decoded once per distinct DCT scale the members' sizes
call for (no member gets a decode smaller than its own size; all in full with
``fast_decode=False``). Each member's probabilities (native padding cropped) are brought to
one common resolution before averaging: the largest member output (by area), bilinear
with half-pixel centres (``align_corners=False``); a member already at that size is not
resampled. With one member the probabilities pass through unchanged,
so its submission is byte-identical to that model's own.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from carvana.data.image_tensors import image_to_tensor
from carvana.data.jpeg import ImageReadError, decode_scale, jpeg_size, read_scaled
from carvana.data.resizing import check_native_frame, fit_decoded
from carvana.data.layout import ORIG_SHAPE, is_native
from carvana.models.registry import ModelConfig, at_size, output_size
from carvana.training import distributed as dist
from carvana.training.callbacks import Callback, CallbackList
from carvana.training.evaluation import batch_probabilities
from carvana.training.streams import ordered_map
from carvana.submission.fingerprint import weights_digest
from carvana.submission.sharded import engine_component
from carvana.submission.sharded import prediction_settings as single_model_settings
from carvana.training.checkpoint import CheckpointError, load_model
from carvana.training.classifier import CarvanaClassifier
from carvana.training.engines import attach_engine


@dataclass
class Member:
    """One model of an ensemble."""

    path: Path
    classifier: CarvanaClassifier
    config: ModelConfig
    weight: float  # normalised: the members' weights sum to 1
    digest: str


def member_paths(spec: str) -> list[Path]:
    """Checkpoints named by a space- or comma-separated list of paths.

    A file is a checkpoint; a folder means the model(s) its run submitted: a ``--refit`` run's
    ``refit/best.pt`` (the model trained on every car; its fold models only chose the threshold),
    else its fold models (``fold*/best.pt``) or, for a single run, its ``best.pt``. An
    unfinished refit is refused rather than replaced by the folds (name them as files instead).
    """
    paths: list[Path] = []
    for item in (s for s in re.split(r"[,\s]+", spec.strip()) if s):
        p = Path(item)
        if p.is_file():
            paths.append(p)
        elif (p / "refit").is_dir():  # pipeline/refit.py's layout: refit.json is written once it is finished
            if not (p / "refit" / "refit.json").is_file() or not (p / "refit" / "best.pt").is_file():
                raise CheckpointError(f"{p / 'refit'}: the refit did not finish (no refit.json); finish it with "
                                      f"--resume --run-name {p.name}, or name the fold models ({p}/fold*/best.pt)")
            paths.append(p / "refit" / "best.pt")
        elif p.is_dir():
            folds = sorted(p.glob("fold*/best.pt"), key=lambda q: int(re.sub(r"\D", "", q.parent.name) or 0))
            found = folds or ([p / "best.pt"] if (p / "best.pt").is_file() else [])
            if not found:
                raise CheckpointError(f"{p}: folder has no fold*/best.pt nor best.pt to use as ensemble members")
            paths.extend(found)
        else:
            raise CheckpointError(f"{p}: ensemble member not found (expected a checkpoint file or a run folder)")
    if not paths:
        raise CheckpointError("--ensemble: no members given")
    return paths


def parse_weights(text: str, n: int) -> list[float]:
    """Per-member weights ('' = equal), normalised to sum 1."""
    if not text.strip():
        return [1.0 / n] * n
    try:
        w = [float(s) for s in re.split(r"[,\s]+", text.strip()) if s]
    except ValueError:
        raise ValueError(f"--ensemble-weights {text!r}: expected numbers separated by spaces or commas") from None
    if len(w) != n or any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"--ensemble-weights {text!r}: need {n} non-negative weights (one per member) with a positive sum")
    return [x / sum(w) for x in w]


def load_members(paths: Sequence[Path], weights: Sequence[float], device: str | torch.device = "cpu",
                 amp: bool = True, channels_last: bool = True, eval_streams: int = 0,
                 engine: str = "torch", int8: Sequence[Any] | None = None,
                 tta_sizes: Sequence[tuple[int, int]] = ()) -> list[Member]:
    """Rebuild each checkpoint's own network (whatever this run's settings say) for prediction.
    ``eval_streams``: batches predicted at once on a CPU (0 = one per core; training/streams.py);
    ``engine``: --engine (training/engines.py); ``int8``: one ``Int8Spec`` per member for --int8
    (training/quantize.py), else float. ``tta_sizes`` (--tta-sizes, multi-scale TTA): each
    checkpoint also predicts images of these data sizes, one member per size sharing its weights,
    the checkpoint's weight split equally between its sizes (its own first)."""
    if int8 and tta_sizes:
        raise CheckpointError("--int8 cannot be used with --tta-sizes: the int8 graph is calibrated and gated at "
                              "the model's own size")
    members = []
    for i, (path, weight) in enumerate(zip(paths, weights)):
        model, config, state = load_model(path, map_location="cpu")
        if config.classes != 1:
            raise CheckpointError(f"{path}: a {config.classes}-class model, which cannot predict the binary Carvana "
                                  "car masks")
        digest = weights_digest(state["model"])
        sizes = list(dict.fromkeys([output_size(config), *(tuple(s) for s in tta_sizes)]))
        for size in sizes:
            try:
                sized = config if size == output_size(config) else at_size(config, size)
            except ValueError as exc:
                raise CheckpointError(f"--tta-sizes {size[0]}x{size[1]}: {path} cannot predict at it ({exc})") from None
            clf = CarvanaClassifier(model, epochs=1, device=str(device), amp=amp, channels_last=channels_last,
                                    progress=False, preview_count=0, model_config=sized, eval_streams=eval_streams)
            attach_engine(clf, engine, digest, int8=int8[i] if int8 else None)
            members.append(Member(Path(path), clf, sized, float(weight) / len(sizes), digest))
    return members


def prediction_size(data_hw: tuple[int, int]) -> tuple[int, int]:
    """The size of the probability maps predicted for images of ``data_hw``: that size, except at
    the native input size, whose padding is cropped off (1280x1918). Not the network's output
    size, which is ``models.registry.output_size(config)`` (its input minus the margin)."""
    return ORIG_SHAPE if is_native(data_hw) else tuple(data_hw)


def size_key(hw: Sequence[int]) -> str:
    return f"image_{hw[0]}x{hw[1]}"


class MultiSizeTestDataset(Dataset):
    """Test images at each of ``sizes``, each exactly as ``TestImageDataset`` would give it.

    Items: {"image_HxW": uint8 (3, H, W) per size, "name", "ok"}. A JPEG is decoded once per
    distinct DCT scale (``decode_scale`` of its header size for each size: no size gets a
    decode smaller than itself; all in full with ``fast_decode=False``); an unreadable one
    gives zeros, ok=False and a warning.
    """

    def __init__(self, images: Sequence[Path], sizes: Sequence[tuple[int, int]], fast_decode: bool = True) -> None:
        self.images = list(images)
        self.sizes = [tuple(s) for s in dict.fromkeys(tuple(s) for s in sizes)]
        self.fast_decode = fast_decode

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        path = self.images[i]
        item: dict[str, Any] = {"name": Path(path).name, "ok": True}
        try:
            orig_hw = jpeg_size(path)
            scales = {s: decode_scale(orig_hw, s, self.fast_decode) for s in self.sizes}
            decoded = {r: read_scaled(path, orig_hw, r) for r in set(scales.values())}
            for s in self.sizes:
                check_native_frame(path, decoded[scales[s]], s)
                item[size_key(s)] = image_to_tensor(fit_decoded(decoded[scales[s]], s, orig_hw))
        except ImageReadError as exc:
            warnings.warn(f"{exc}; predicting an empty mask for it", stacklevel=1)
            item["ok"] = False
            for s in self.sizes:
                item[size_key(s)] = torch.zeros((3, *s), dtype=torch.uint8)
        return item


class EnsemblePredictor:
    """Averages its members' probabilities per batch and feeds them to the callbacks."""

    def __init__(self, members: Sequence[Member], progress: bool = True) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = list(members)
        self.device = self.members[0].classifier.device
        # Images are resized to each member's data size (its output); a valid-convolution net
        # (unet-original) mirror-pads them to its larger input itself, as in training.
        self.sizes = [output_size(m.config) for m in self.members]
        self.output_hw = max((prediction_size(s) for s in self.sizes), key=lambda hw: (hw[0] * hw[1], hw))
        self.progress = progress and dist.is_main_process()
        self.streams = self.members[0].classifier.streams

    def tag(self) -> str:
        """Identifies the ensemble for resuming a partial submission: every member's weights
        content, model config and weight, in order."""
        if len(self.members) == 1:  # one model: the identity its own prediction has (prediction_settings)
            return ""
        parts = [{"digest": m.digest, "config": m.config.to_dict(), "weight": repr(m.weight)} for m in self.members]
        return "ensemble:" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def prediction_settings(self, input_hw: tuple[int, int], tta: bool, fast_decode: bool = True) -> dict[str, Any]:
        """The submission fingerprint's components: every member's weights content, config and
        weight (in order), the common resolution, TTA, the decoding setting and precision. One
        member has a single model's components, so its submission resumes and matches as that
        model's own."""
        if len(self.members) == 1:
            return single_model_settings(self.members[0].classifier, output_size(self.members[0].config), tta,
                                         fast_decode)
        return {
            "tta": bool(tta), "fast_decode": bool(fast_decode), "ensemble_resolution": list(self.output_hw),
            "members": [{"weights": m.digest, "model_config": m.config.to_dict(), "weight": repr(m.weight)}
                        for m in self.members],
            "precision": sorted({str(m.classifier.amp_dtype or "float32") for m in self.members}),
            **engine_component(self.members[0].classifier),
        }

    def describe(self) -> str:
        if len(self.members) == 1:
            return f"{self.members[0].path} ({self.members[0].config.describe()})"
        return (f"ensemble of {len(self.members)}: " + ", ".join(f"{m.path} ({m.config.describe()}, w={m.weight:.3g})"
                for m in self.members) + f"; averaged at {self.output_hw[0]}x{self.output_hw[1]}")

    def test_dataset(self, images: Sequence[Path], fast_decode: bool = True) -> Dataset:
        return MultiSizeTestDataset(images, self.sizes, fast_decode)

    @torch.no_grad()
    def average(self, batch: dict, tta: bool = False) -> torch.Tensor:
        """The weighted mean (B, h, w) probabilities of one loader batch, on the device.
        Call inside :meth:`fixed_weights`; safe on several threads."""
        acc = None
        for m in self.members:
            sub = {"image": batch[size_key(output_size(m.config))], "name": batch["name"], "ok": batch["ok"]}
            p = batch_probabilities(m.classifier, sub, tta).float()
            if len(self.members) == 1:
                return p  # byte-identical to the model's own prediction
            if tuple(p.shape[-2:]) != self.output_hw:
                p = F.interpolate(p[:, None], size=self.output_hw, mode="bilinear", align_corners=False)[:, 0]
            p = p.to(self.device) * m.weight
            acc = p if acc is None else acc + p
        return acc

    @contextmanager
    def fixed_weights(self) -> Iterator[None]:
        """Every member's eval mode and fixed-weights context (an eval loop)."""
        with ExitStack() as stack:
            for m in self.members:
                stack.enter_context(m.classifier.fixed_weights())
            yield

    def predict(self, loader: Iterable[dict], callbacks: Iterable[Callback] = (), tta: bool = False) -> None:
        """Same contract as ``CarvanaClassifier.predict``: callbacks get averaged probabilities,
        in order; on a CPU several batches at once (the first member's streams)."""
        cbs = CallbackList(callbacks)
        cbs.on_predict_start(self)
        try:
            with self.fixed_weights():
                bar = tqdm(loader, desc=f"predict x{len(self.members)}", dynamic_ncols=True,
                           disable=None if self.progress else True)  # None: no bar when not a terminal
                for batch, probs in ordered_map(partial(self.average, tta=tta), bar, self.streams):
                    cbs.on_predict_batch_end(self, list(batch["name"]), probs)
        except BaseException as exc:
            cbs.on_exception(self, exc)
            raise
        cbs.on_predict_end(self)
