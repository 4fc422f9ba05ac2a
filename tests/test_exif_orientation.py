"""EXIF-rotated JPEGs: image pixels, masks and predicted masks all stay in the file's raw orientation.

The photo is 40 rows x 60 columns as stored, with a red band in its top 10 rows, and carries
EXIF Orientation=6 ("rotate 90 CW to display"), so a decoder that applies EXIF gives 60x40.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from carvana.data.class_datasets import SegmentationDataset
from carvana.data.datasets import TestImageDataset, jpeg_size, read_image

RAW_HW = (40, 60)
BAND = 10  # red rows at the top of the raw image


def write_rotated_photo(path: Path) -> None:
    rgb = np.zeros(RAW_HW + (3,), np.uint8)
    rgb[:BAND, :, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, exif=exif, quality=95)


def test_images_are_read_in_raw_orientation_like_their_size(tmp_path):
    # Fails on the old code: cv2 applied the EXIF rotation (60x40) while jpeg_size gave 40x60.
    path = tmp_path / "rot.jpg"
    write_rotated_photo(path)
    assert jpeg_size(path) == RAW_HW
    image = read_image(path)
    assert image.shape == RAW_HW + (3,)
    assert image[:BAND - 2, :, 0].min() > 200 and image[BAND + 2:, :, 0].max() < 60  # the band is at the top
    assert read_image(path, reduction=2).shape == (RAW_HW[0] // 2, RAW_HW[1] // 2, 3)
    assert tuple(TestImageDataset([path], (20, 30))[0]["image"].shape) == (3, 20, 30)


def test_segmentation_items_line_image_and_mask_up(tmp_path):
    path, mask_path = tmp_path / "images" / "rot.jpg", tmp_path / "masks" / "rot.png"
    write_rotated_photo(path)
    mask = np.zeros(RAW_HW, np.uint8)
    mask[:BAND] = 1  # class 1 where the band is, in the raw orientation masks are stored in
    mask_path.parent.mkdir(parents=True)
    Image.fromarray(mask, mode="L").save(mask_path)
    item = SegmentationDataset([path], [mask_path], (20, 30), "index", 2, full_masks=True)[0]
    red, labels = item["image"][0].numpy(), item["mask"].numpy()
    assert item["full_mask"].shape == RAW_HW and labels.shape == (20, 30)
    assert red[labels == 1].min() > 200 and red[labels == 0].max() < 60  # red pixels are exactly class 1


def test_predicted_palette_pngs_are_at_raw_size_and_orientation(tmp_path):
    from carvana.submission.masks import predict_to_masks
    from carvana.training.classifier import CarvanaClassifier
    from carvana.training.tasks import MultiClassTask

    path = tmp_path / "imgs" / "rot.jpg"
    write_rotated_photo(path)
    model = torch.nn.Conv2d(3, 2, 1)  # class 1 where the (normalised) red channel is positive
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
        model.weight[1, 0] = 1.0
    clf = CarvanaClassifier(model, epochs=1, device="cpu", progress=False, task=MultiClassTask(2))
    out = tmp_path / "masks"
    assert predict_to_masks(clf, [path], out, (16, 24), ["other", "red"], batch_size=1, loader_workers=0) == 1
    with Image.open(out / "rot.png") as png:
        labels = np.asarray(png)
    assert labels.shape == RAW_HW
    assert (labels[:BAND - 2] == 1).all() and (labels[BAND + 2:] == 0).all()
