"""``--int8``: the OpenVINO prediction graph quantized to int8 by NNCF, behind an accuracy gate.

* **Quantization** (:class:`Int8Spec`): ``nncf.quantize`` (post-training, min/max statistics
  plus fast bias correction) of the graph ``--engine openvino`` compiles (training/engines.py),
  calibrated on up to ``CALIBRATION_IMAGES`` TRAINING images loaded exactly as test images are
  (``TestImageDataset``: same decode and resize; the graph normalises and folds the TTA in),
  never on a test image nor on the images the gate scores. Kept in float (NNCF
  ``ignored_scope``): :data:`SCOPE`, see :func:`kept_in_float`. The int8 IR is cached beside the
  float graph (``output/engines/<key>/int8.xml``), the key holding the scope and the
  calibration images' identity.
* **The gate** (:meth:`Int8Plan.gate`): before any test prediction each member predicts its
  held-out images with the same engine in float and in int8, scored by the OOF code
  (training/oof.py: upsampled to 1918x1280, the run's threshold, the competition's Dice). A
  drop above ``--int8-max-drop`` is an :class:`Int8Error`: one line, exit 1, nothing predicted.

Why ``nncf.quantize`` plus this gate and not ``nncf.quantize_with_accuracy_control``: the
latter keeps reverting layers to float until the drop fits, which costs a validation pass per
layer ranked (minutes to hours at full size on a CPU) and never refuses; a scope chosen once by
measurement (bench/README.md) and a gate on the pipeline's own scoring cost two predictions of
the held-out images and say plainly when int8 does not hold.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from carvana.data.files import write_bytes_atomic
from carvana.training import distributed as dist
from carvana.training.engines import EngineError, EngineSlot, choose_engine

CALIBRATION_IMAGES = 300  # NNCF's own default subset size
GATE_IMAGES = 512  # held-out images scored twice (float, int8) at most: bounds the gate's time on a large split
SCOPES = ("ends", "full-resolution")
SCOPE = "ends"  # measured (bench/README.md): both scopes hold test Dice to 1e-4; "ends" 1.48x torch, the other 1.28x


class Int8Error(EngineError):
    """--int8 refused: where it cannot run, or where it costs more Dice than --int8-max-drop."""


def nncf_version() -> str:
    """NNCF's version ('' when it is not installed)."""
    try:
        import nncf
    except ImportError:
        return ""
    return str(nncf.__version__)


def check_int8(engine: str, device: str | torch.device) -> None:
    """Refuse ``--int8`` in one line where it cannot run: on CUDA, with --engine torch or
    onnxruntime, or without OpenVINO and NNCF."""
    device = torch.device(device)
    if device.type != "cpu":
        raise Int8Error(f"--int8: quantizes the CPU engine's graph; this run predicts on {device} (predict without "
                        "--int8)")
    if engine in ("torch", "onnxruntime"):
        raise Int8Error(f"--int8: quantizes the OpenVINO graph; --engine {engine} cannot run it (use --engine openvino "
                        "or auto, or predict without --int8)")
    if choose_engine(engine, device) != "openvino" or not nncf_version():
        raise Int8Error("--int8: needs OpenVINO and NNCF, not installed here (pip install -r requirements.txt)")


def images_identity(images: Sequence[Path]) -> str:
    """A digest of the images' names and byte sizes: the calibration set in the cache key."""
    h = hashlib.sha256()
    for p in images:
        h.update(f"{Path(p).name}:{Path(p).stat().st_size if Path(p).exists() else -1}\n".encode())
    return h.hexdigest()[:16]


def kept_in_float(model: Any, scope: str) -> list[str]:
    """The convolutions NNCF leaves in float: the first (it sees the raw colours) and the last
    (the 1x1 head whose logits are thresholded), and with ``full-resolution`` every convolution
    whose output is more than half the input's height (the U's top level: few channels, the
    edges the Dice counts)."""
    if scope not in SCOPES:
        raise Int8Error(f"--int8: unknown scope {scope!r}; expected one of {', '.join(SCOPES)}")
    convs = [op for op in model.get_ordered_ops()
             if op.get_type_name() in ("Convolution", "GroupConvolution", "ConvolutionBackpropData")]
    if not convs:
        return []
    names = {convs[0].get_friendly_name(), convs[-1].get_friendly_name()}
    if scope == "full-resolution":
        height = model.input(0).get_partial_shape()[2].get_length()
        names |= {op.get_friendly_name() for op in convs if 2 * op.get_output_partial_shape(0)[2].get_length() > height}
    return sorted(names)


def quantize_graph(onnx: Path, images: Sequence[Path], input_hw: tuple[int, int], scope: str,
                   fast_decode: bool = True) -> Any:
    """The ONNX prediction graph as an int8 OpenVINO model, calibrated on ``images`` (one
    image per calibration sample, loaded as the test set is)."""
    import logging

    # NNCF's backend check imports torch.utils.cpp_extension, which warns on a machine with nvcc and no CUDA.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import nncf
    import openvino as ov
    from torch.utils.data import DataLoader

    from carvana.data.datasets import TestImageDataset

    nncf.set_log_level(logging.ERROR)  # its INFO lines: the "engine:" line says what was built
    model = ov.Core().read_model(str(onnx))
    loader = DataLoader(TestImageDataset(list(images), input_hw, fast_decode=fast_decode), batch_size=1)
    data = nncf.Dataset(loader, lambda item: item["image"].numpy())
    return nncf.quantize(model, data, subset_size=len(images), ignored_scope=nncf.IgnoredScope(
        names=kept_in_float(model, scope)))


@dataclass(frozen=True)
class Int8Spec:
    """What an engine needs to build the int8 graph: the calibration images and the scope."""

    calibration: tuple[Path, ...]
    scope: str = SCOPE
    fast_decode: bool = True

    @property
    def identity(self) -> str:
        """The int8 part of the cache key and of the submission fingerprint."""
        return f"int8-{self.scope}-{images_identity(self.calibration)}"

    def quantized(self, onnx: Path, folder: Path, input_hw: tuple[int, int]) -> Path:
        """``folder/int8.xml``: quantized once, written atomically (the .bin first, the .xml
        that names a finished model last)."""
        import tempfile

        import openvino as ov

        xml = folder / "int8.xml"
        if not xml.is_file():
            model = quantize_graph(onnx, self.calibration, input_hw, self.scope, self.fast_decode)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:  # OpenVINO insists on the .xml suffix
                ov.serialize(model, f"{tmp}/int8.xml", f"{tmp}/int8.bin")  # as-is: no fp16 compression
                for name in ("int8.bin", "int8.xml"):
                    write_bytes_atomic(folder / name, (Path(tmp) / name).read_bytes())
        return xml


def spread(items: Sequence[Any], n: int) -> list[Any]:
    """At most ``n`` of ``items``, evenly spaced (every car and angle of a sorted list)."""
    items = list(items)
    if len(items) <= n:
        return items
    return [items[i * len(items) // n] for i in range(n)]


@dataclass
class MemberImages:
    """One member's calibration images and the images its gate scores (with their masks)."""

    calibration: list[Path]
    held_out: list[Path]
    masks: list[Path]
    held: bool = True  # False: nothing was held out, the gate scores training images


def member_images(path: Path, train: tuple[list, list], valid: tuple[list, list], fold_table: Any = None,
                  models_dir: Path | None = None) -> MemberImages:
    """Images for one member. A fold model of this run (``models_dir/fold<k>/best.pt``, with the
    run's ``fold_table``) is gated on its fold's held-out cars and calibrated on the other
    folds; any other model on the validation split, calibrated on the training split; with
    nothing held out, a sample of training images is scored and calibration takes the rest."""
    train_i, valid_i, valid_m = list(train[0]), list(valid[0]), list(valid[1])
    match = re.fullmatch(r"fold(\d+)", Path(path).parent.name)
    if fold_table is not None and match and models_dir is not None and Path(path).parent.parent == Path(models_dir):
        from carvana.training.folds import fold_files

        try:
            train_i, _, valid_i, valid_m = fold_files(fold_table, int(match.group(1)), train_i + valid_i,
                                                      list(train[1]) + valid_m)
        except KeyError:  # a folds.csv of other images (another --sample-size): not this model's split
            train_i, valid_i, valid_m = list(train[0]), list(valid[0]), list(valid[1])
    if valid_i:
        pick = spread(range(len(valid_i)), GATE_IMAGES)
        return MemberImages(spread(train_i, CALIBRATION_IMAGES), [valid_i[i] for i in pick], [valid_m[i] for i in pick])
    pick = spread(range(len(train[0])), min(GATE_IMAGES, max(1, len(train[0]) // 4)))
    scored = set(pick)
    rest = [p for i, p in enumerate(train[0]) if i not in scored] or list(train[0])
    return MemberImages(spread(rest, CALIBRATION_IMAGES), [train[0][i] for i in pick], [train[1][i] for i in pick],
                        held=False)


@dataclass
class Int8Plan:
    """--int8 for one prediction: each member's images and spec, and the gate."""

    images: list[MemberImages]
    max_drop: float
    settings: Any  # tta, predict_batch_size, workers, fast_decode (main.py's settings)
    mask_rles: Any = None
    scope: str = SCOPE
    specs: list[Int8Spec] = field(init=False)

    def __post_init__(self) -> None:
        self.specs = [Int8Spec(tuple(m.calibration), self.scope, bool(self.settings.fast_decode)) for m in self.images]

    def gate(self, members: Sequence[Any], threshold: float) -> list[dict[str, Any]]:
        """Score every member in float and in int8 on its held-out images (rank 0; the other
        ranks wait for its verdict); one line each; an Int8Error on the first drop too large.
        Returns each member's figures (for the run's summary)."""
        verdict, figures = None, []
        if dist.is_main_process():
            for i, (member, images) in enumerate(zip(members, self.images)):
                fp, q = gate_scores(member, images, threshold, self.settings, self.mask_rles)
                line = gate_line(fp, q, images, self.max_drop, f" (member {i + 1})" if len(members) > 1 else "")
                if fp - q > self.max_drop:
                    verdict = line
                    break
                print(line)
                figures.append({"float_dice": fp, "int8_dice": q, "images": len(images.held_out),
                                "held_out": images.held, "scope": self.scope})
        verdict = dist.broadcast_object(verdict)
        if verdict:
            raise Int8Error(verdict)
        return figures


def float_twin(slot: EngineSlot) -> EngineSlot:
    """The same engine for the same model without int8: what the gate compares against."""
    return EngineSlot(slot.name, slot.asked, slot.model, slot.config, slot.digest, slot.amp, slot.streams,
                      slot.cache_dir, slot.pad)


def gate_scores(member: Any, images: MemberImages, threshold: float, settings: Any, mask_rles: Any = None
                ) -> tuple[float, float]:
    """(float Dice, int8 Dice) of ``member`` on ``images.held_out``: the OOF scoring, at
    ``threshold``, with the run's TTA, batch and decoding."""
    from carvana.models.registry import output_size
    from carvana.training.oof import dice_column, score_fold

    clf, int8_slot = member.classifier, member.classifier.engine
    scores = []
    try:
        for slot in (float_twin(int8_slot), int8_slot):
            clf.engine = slot
            frame = score_fold(clf, images.held_out, images.masks, output_size(member.config), [threshold],
                               settings.tta, settings.predict_batch_size, settings.workers, mask_rles,
                               fast_decode=settings.fast_decode)
            scores.append(float(frame[dice_column(threshold)].mean()))
    finally:
        clf.engine = int8_slot
    return scores[0], scores[1]


def gate_line(fp: float, q: float, images: MemberImages, max_drop: float, who: str = "") -> str:
    """The gate's verdict in one line."""
    where = (f"{len(images.held_out)} held-out images" if images.held else
             f"{len(images.held_out)} training images (nothing held out)")
    if fp - q > max_drop:
        return (f"--int8: validation Dice fell by {fp - q:.5f} ({fp:.5f} -> {q:.5f}) on {where}{who}, more than "
                f"--int8-max-drop {max_drop:g}; predict without --int8 or raise the limit")
    return (f"int8: validation Dice {fp:.5f} -> {q:.5f} (drop {fp - q:+.5f}) on {where}{who}, within "
            f"--int8-max-drop {max_drop:g}")


def plan_int8(settings: Any, device: str | torch.device, data: Any, paths: Sequence[Path],
              models_dir: Path | None = None, fold_table_csv: Path | None = None) -> Int8Plan:
    """--int8 for ``paths``: refused in one line where it cannot run, else each member's
    images and spec. ``data``: the run's TaskData (train and validation images, masks); with
    --folds, the run's ``models_dir`` and its ``folds.csv`` say which cars each fold held out."""
    check_int8(settings.engine, device)
    table = None
    if fold_table_csv is not None and Path(fold_table_csv).is_file():
        import pandas as pd

        table = pd.read_csv(fold_table_csv, dtype={"image": str, "car": str})
    images = [member_images(p, (data.train_images, data.train_masks), (data.valid_images, data.valid_masks), table,
                            models_dir) for p in paths]
    return Int8Plan(images, float(settings.int8_max_drop), settings, getattr(data, "mask_rles", None))
