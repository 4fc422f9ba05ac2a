"""Multi-class datasets (``--dataset oxford-pet | carla | folder``): layouts, class masks, split.

Each adapter lists (image, mask) pairs in its data set's own layout and says how to turn a
mask file into class ids 0..N-1 (255 = ignore):

* ``oxford-pet``: ``images/<Breed>_<n>.jpg`` + ``annotations/trimaps/<same>.png`` (values
  1 pet, 2 background, 3 border -> 0, 1, 2). The official ``annotations/trainval.txt`` /
  ``test.txt`` are used when present (train on trainval, predict test); else a seeded split
  stratified by breed.
* ``carla``: ``CameraRGB/*.png`` + ``CameraSeg/`` (or ``CameraMask/``) with the same names,
  the class id in the mask's RED channel (read with PIL, RGB order; OpenCV would give BGR).
  Consecutive frames (names equal but for the last character) stay on one side of the split.
* ``folder``: ``images/*`` + ``masks/<stem>.png`` holding class indices (mode L or P).

Images are read in their stored (raw) orientation, EXIF Orientation ignored, because masks are
stored in it: image, mask and predicted mask pixels line up, at the same size.

A mask that is missing, of another size than its image, or holds a value >= N other than
255 is an :class:`ImageReadError` naming the file (and the value).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate

from carvana.data.image_tensors import image_to_tensor
from carvana.data.jpeg import ImageReadError, jpeg_size, read_for_input
from carvana.data.resizing import resize_decoded
from carvana.data.sources.fetcher import DatasetLayoutError
from carvana.data.sampling import sample_seed

IGNORE_INDEX = 255
DATASETS = ("carvana", "oxford-pet", "carla", "folder")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
OXFORD_PET_CLASSES = ("pet", "background", "border")
# CARLA semantic tags: 0.8.x has the first 13, 0.9.10+ all 23.
CARLA_CLASSES = ("none", "buildings", "fences", "other", "pedestrians", "poles", "road lines", "roads", "sidewalks",
                 "vegetation", "vehicles", "walls", "traffic signs", "sky", "ground", "bridge", "rail track",
                 "guard rail", "traffic light", "static", "dynamic", "water", "terrain")


@dataclass
class SegmentationData:
    """The listed files of a multi-class data set, split, with how to read its masks."""

    source: str
    classes: int
    class_names: list[str]
    mask_kind: str  # "trimap" | "red" | "index": see read_class_mask
    train_images: list[Path] = field(default_factory=list)
    train_masks: list[Path] = field(default_factory=list)
    valid_images: list[Path] = field(default_factory=list)
    valid_masks: list[Path] = field(default_factory=list)
    test_images: list[Path] = field(default_factory=list)
    test_source: str = ""  # where test_images came from (a test list, --test-dir, or the validation images)


def read_class_mask(path: Path, kind: str, classes: int) -> np.ndarray:
    """A mask file -> (H, W) uint8 class ids in 0..classes-1 or 255; errors name the file and value.

    ``kind``: "trimap" (Oxford-IIIT Pet values 1..3 -> 0..2), "red" (CARLA: the red channel of
    an RGB PNG), "index" (a single-channel PNG of class indices, mode L or P).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: mask file missing")
    try:
        with Image.open(path) as im:
            mode = im.mode
            if kind == "red":
                if mode not in ("RGB", "RGBA"):
                    raise ImageReadError(f"{path}: CARLA mask is mode {mode}, expected RGB (class id in the red channel)")
                mask = np.asarray(im)[..., 0]  # PIL gives RGB order: index 0 is red
            else:
                if mode not in ("L", "P"):
                    raise ImageReadError(f"{path}: mask is mode {mode}, expected a single-channel PNG of class ids (L or P)")
                mask = np.asarray(im)
    except (OSError, SyntaxError) as exc:
        raise ImageReadError(f"{path}: not a readable mask image ({exc})") from exc
    if kind == "trimap":
        values = np.unique(mask)
        bad = values[(values < 1) | (values > 3)]
        if bad.size:
            raise ImageReadError(f"{path}: trimap value {int(bad[0])}; Oxford-IIIT Pet trimaps hold 1 (pet), "
                                 "2 (background), 3 (border)")
        return (mask - 1).astype(np.uint8)
    values = np.unique(mask)
    bad = values[(values >= classes) & (values != IGNORE_INDEX)]
    if bad.size:
        raise ImageReadError(f"{path}: class id {int(bad[0])} in mask, but --classes is {classes} "
                             f"(ids 0..{classes - 1}, 255 = ignore)")
    return np.array(mask, dtype=np.uint8)  # a writable copy (PIL's buffer is read-only)


def seeded_split(names: Sequence[str], validation_size: float, seed: int,
                 group_of: Callable[[str], str] = lambda n: n,
                 stratum_of: Callable[[str], str] = lambda n: "") -> tuple[list[str], list[str]]:
    """(train, valid) names: whole groups go to one side, ``validation_size`` of each stratum's
    groups (at least one where a stratum has two or more) to valid. Seeded; lists sorted."""
    if not 0 <= validation_size < 1:
        raise ValueError(f"validation_size must be in [0, 1), got {validation_size!r}")
    rng, valid_groups = random.Random(seed), set()
    strata: dict[str, set[str]] = {}
    for n in names:
        strata.setdefault(stratum_of(n), set()).add(group_of(n))
    for stratum in sorted(strata):
        groups = sorted(strata[stratum])
        rng.shuffle(groups)
        k = round(len(groups) * validation_size)
        if validation_size > 0 and len(groups) >= 2:
            k = min(max(k, 1), len(groups) - 1)
        valid_groups.update(groups[:k])
    names = sorted(names)
    return [n for n in names if group_of(n) not in valid_groups], [n for n in names if group_of(n) in valid_groups]


def _images_in(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DatasetLayoutError(f"{folder}: folder does not exist")
    found = {p.stem: p for p in sorted(folder.iterdir())
             if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")}
    if not found:
        raise DatasetLayoutError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return found


def _read_list(path: Path) -> list[str]:
    """Oxford-IIIT Pet list file: first word of each non-comment line is the image stem."""
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def load_segmentation_data(dataset: str, root: Path, classes: int, validation_size: float = 0.2, seed: int = 0,
                           test_dir: Path | None = None, class_names: Sequence[str] | None = None) -> SegmentationData:
    """List and split the data set ``dataset`` at ``root``; see the module docstring for layouts."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"{root}: data folder does not exist")
    test_list: list[str] | None = None
    group_of, stratum_of = (lambda n: n), (lambda n: "")
    if dataset == "oxford-pet":
        if classes != 3:
            raise ValueError(f"--dataset oxford-pet has 3 classes (pet, background, border); got --classes {classes}")
        images, mask_dir, kind, names = _images_in(root / "images"), root / "annotations" / "trimaps", "trimap", OXFORD_PET_CLASSES
        stratum_of = lambda n: n.rsplit("_", 1)[0]  # noqa: E731 (the breed)
        trainval, test = root / "annotations" / "trainval.txt", root / "annotations" / "test.txt"
        if trainval.is_file() and test.is_file():
            images = {n: _listed(images, n, trainval) for n in _read_list(trainval)} | {
                n: _listed(images, n, test) for n in _read_list(test)}
            test_list = _read_list(test)
    elif dataset == "carla":
        if classes not in (13, 23):
            raise ValueError(f"--dataset carla has 13 (CARLA 0.8) or 23 (0.9.10+) classes; got --classes {classes}")
        images, kind, names = _images_in(root / "CameraRGB"), "red", CARLA_CLASSES[:classes]
        mask_dir = next((root / d for d in ("CameraSeg", "CameraMask") if (root / d).is_dir()), None)
        if mask_dir is None:
            raise DatasetLayoutError(f"{root}: no CameraSeg/ or CameraMask/ folder next to CameraRGB/")
        group_of = lambda n: n[:-1]  # noqa: E731 (consecutive frames are near duplicates)
    elif dataset == "folder":
        if classes < 2:
            raise ValueError("--dataset folder needs --classes N >= 2 (the number of class ids in its masks)")
        images, mask_dir, kind, names = _images_in(root / "images"), root / "masks", "index", [f"class {c}" for c in range(classes)]
    else:
        raise ValueError(f"unknown --dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    if class_names:
        names = list(class_names)
    if len(names) != classes:
        raise ValueError(f"{len(names)} class names ({', '.join(names)}) for {classes} classes")
    masks = {n: mask_dir / f"{n}.png" for n in images}
    missing = [masks[n] for n in sorted(images) if not masks[n].is_file() and (test_list is None or n not in test_list)]
    if missing:
        raise ImageReadError(f"{missing[0]}: mask file missing (for image {images[Path(missing[0]).stem]}; "
                             f"{len(missing)} image(s) without a mask)")
    labelled = [n for n in images if test_list is None or n not in set(test_list)]
    train, valid = seeded_split(labelled, validation_size, seed, group_of, stratum_of)
    data = SegmentationData(source=f"{dataset} at {root}", classes=classes, class_names=list(names), mask_kind=kind,
                            train_images=[images[n] for n in train], train_masks=[masks[n] for n in train],
                            valid_images=[images[n] for n in valid], valid_masks=[masks[n] for n in valid])
    if test_list is not None:
        data.test_images, data.test_source = [images[n] for n in test_list], "the data set's test list"
    elif test_dir is not None:
        data.test_images, data.test_source = sorted(_images_in(Path(test_dir)).values()), f"--test-dir {test_dir}"
    else:
        data.test_images, data.test_source = list(data.valid_images), "the validation images"
    return data


def _listed(images: dict[str, Path], name: str, listing: Path) -> Path:
    if name not in images:
        raise DatasetLayoutError(f"{listing}: lists {name!r}, which has no image in {listing.parent.parent / 'images'}")
    return images[name]


def resize_labels(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of class ids (never interpolate labels)."""
    return cv2.resize(mask, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)


class SegmentationDataset(Dataset):
    """Images with class-id masks, resized to ``input_hw``: {"image": (3,H,W) uint8, "mask": (H,W)
    uint8 class ids, "name"} and with ``full_masks`` the (h,w) mask at the image's own size.
    A JPEG is decoded at the DCT scale for ``input_hw`` (in full with ``fast_decode=False``), other
    formats in full; masks always in full."""

    def __init__(self, images: Sequence[Path], masks: Sequence[Path], input_hw: tuple[int, int], mask_kind: str,
                 classes: int, transform: A.Compose | None = None, full_masks: bool = False, seed: int = 0,
                 fast_decode: bool = True) -> None:
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} images but {len(masks)} masks")
        self.images, self.masks = list(images), list(masks)
        self.input_hw, self.mask_kind, self.classes = tuple(input_hw), mask_kind, classes
        self.transform, self.full_masks, self.seed = transform, full_masks, seed
        self.fast_decode = fast_decode

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, i = key if isinstance(key, tuple) else (None, key)
        if epoch is not None and self.transform is not None:  # EpochSampler: augmentation fixed by (seed, epoch, i)
            self.transform.set_random_seed(sample_seed(self.seed, epoch, i))
        image_path, mask_path = Path(self.images[i]), Path(self.masks[i])
        full = read_class_mask(mask_path, self.mask_kind, self.classes)
        hw = jpeg_size(image_path)
        if hw != full.shape:
            raise ImageReadError(f"{mask_path}: mask is {full.shape[1]}x{full.shape[0]} but image {image_path} "
                                 f"is {hw[1]}x{hw[0]} (W x H)")
        image = resize_decoded(read_for_input(image_path, self.input_hw, self.fast_decode)[0], self.input_hw, hw)
        mask = resize_labels(full, self.input_hw)
        if self.transform is not None:  # albumentations: masks use nearest, colour jitter touches the image only
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        item = {"image": image_to_tensor(image), "mask": torch.from_numpy(np.ascontiguousarray(mask, np.uint8)),
                "name": image_path.name}
        if self.full_masks:
            item["full_mask"] = torch.from_numpy(full)
        return item


def collate_segmentation(items: list[dict]) -> dict:
    """default_collate, except that "full_mask" stays a list (images differ in size)."""
    fulls = [it.pop("full_mask") for it in items] if items and "full_mask" in items[0] else None
    batch = default_collate(items)
    if fulls is not None:
        batch["full_mask"] = fulls
    return batch

