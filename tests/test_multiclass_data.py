"""Multi-class data layouts (Oxford-IIIT Pet, CARLA, folder), bad masks, augmentation, demo trimaps,
palette PNG prediction; the real samples in ../shared where present."""

import numpy as np
import pytest
import torch
from PIL import Image

from carvana.data.datasets import ImageReadError, train_augmentation
from carvana.data.demo.trimap import write_demo_trimap_dataset
from carvana.data.sources.fetcher import DatasetLayoutError
from carvana.data.class_datasets import SegmentationDataset, collate_segmentation, load_segmentation_data, read_class_mask
from carvana.data.palette import PALETTE

from conftest import SHARED

OXFORD, CARLA = SHARED / "oxford-pet-sample", SHARED / "carla-sample"


def save_rgb(path, hw=(20, 30), seed=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 255, (*hw, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, format=fmt)


def make_oxford(root, breeds=("Abyssinian", "beagle"), per_breed=4, hw=(20, 30)):
    for b in breeds:
        for i in range(1, per_breed + 1):
            save_rgb(root / "images" / f"{b}_{i}.jpg", hw, i)
            trimap = np.full(hw, 2, np.uint8)
            trimap[5:15, 5:20], trimap[5, 5:20] = 1, 3
            (root / "annotations" / "trimaps").mkdir(parents=True, exist_ok=True)
            Image.fromarray(trimap, mode="L").save(root / "annotations" / "trimaps" / f"{b}_{i}.png")
    return root


def test_oxford_pet_trimaps_map_to_0_1_2_and_split_stratified_by_breed(tmp_path):
    root = make_oxford(tmp_path / "pets")
    data = load_segmentation_data("oxford-pet", root, 3, validation_size=0.25, seed=1)
    assert data.class_names == ["pet", "background", "border"] and data.mask_kind == "trimap"
    assert sorted(p.name.split("_")[0] for p in data.valid_images) == ["Abyssinian", "beagle"]  # one per breed
    assert len(data.train_images) == 6 and data.test_images == data.valid_images
    mask = read_class_mask(data.train_masks[0], "trimap", 3)
    assert mask[10, 10] == 0 and mask[0, 0] == 1 and mask[5, 10] == 2 and mask.dtype == np.uint8
    assert load_segmentation_data("oxford-pet", root, 3, 0.25, seed=1).valid_images == data.valid_images  # seeded


def test_oxford_pet_official_lists_train_on_trainval_and_predict_test(tmp_path):
    root = make_oxford(tmp_path / "pets")
    (root / "annotations" / "trainval.txt").write_text("Abyssinian_1 1 1 1\nAbyssinian_2 1 1 1\nbeagle_1 2 2 1\nbeagle_2 2 2 1\n")
    (root / "annotations" / "test.txt").write_text("Abyssinian_3 1 1 1\nbeagle_3 2 2 1\n")
    data = load_segmentation_data("oxford-pet", root, 3, validation_size=0.5, seed=0)
    assert sorted(p.stem for p in data.train_images + data.valid_images) == ["Abyssinian_1", "Abyssinian_2", "beagle_1", "beagle_2"]
    assert [p.stem for p in data.test_images] == ["Abyssinian_3", "beagle_3"] and data.test_source == "the data set's test list"


def test_carla_reads_the_red_channel_not_opencvs_first_channel(tmp_path):
    root = tmp_path / "carla"
    for name in ("02_00_000", "02_00_001", "02_00_010", "02_00_011"):
        save_rgb(root / "CameraRGB" / f"{name}.png", (12, 16))
        seg = np.zeros((12, 16, 3), np.uint8)
        seg[..., 0], seg[..., 1], seg[..., 2] = 7, 40, 99  # red = class 7; green/blue must be ignored
        seg[:6, :, 0] = 12
        (root / "CameraSeg").mkdir(exist_ok=True)
        Image.fromarray(seg, mode="RGB").save(root / "CameraSeg" / f"{name}.png")
    data = load_segmentation_data("carla", root, 13, validation_size=0.5, seed=0)
    assert data.mask_kind == "red" and data.class_names[7] == "roads" and len(data.class_names) == 13
    # consecutive frames (000/001, 010/011) stay on one side of the split
    assert {p.stem[:-1] for p in data.valid_images}.isdisjoint({p.stem[:-1] for p in data.train_images})
    mask = read_class_mask(data.train_masks[0], "red", 13)
    assert set(np.unique(mask)) == {7, 12}
    with pytest.raises(ValueError, match="13 .* or 23"):
        load_segmentation_data("carla", root, 5)


def test_folder_layout_and_a_test_dir(tmp_path):
    root = tmp_path / "mine"
    for i in range(5):
        save_rgb(root / "images" / f"im{i}.png", (10, 14), i)
        (root / "masks").mkdir(exist_ok=True)
        mask = np.full((10, 14), i % 4, np.uint8)
        mask[0, 0] = 255  # ignore is allowed
        Image.fromarray(mask, mode="L").save(root / "masks" / f"im{i}.png")
    save_rgb(tmp_path / "new" / "x.jpg", (9, 9))
    data = load_segmentation_data("folder", root, 4, 0.2, 0, test_dir=tmp_path / "new", class_names=["a", "b", "c", "d"])
    assert len(data.train_images) == 4 and len(data.valid_images) == 1 and [p.name for p in data.test_images] == ["x.jpg"]
    ds = SegmentationDataset(data.train_images, data.train_masks, (8, 8), "index", 4, full_masks=True)
    batch = collate_segmentation([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 8, 8) and batch["mask"].shape == (2, 8, 8) and batch["mask"].dtype == torch.uint8
    assert [tuple(m.shape) for m in batch["full_mask"]] == [(10, 14), (10, 14)] and batch["full_mask"][0][0, 0] == 255


def test_bad_masks_are_rejected_naming_the_file_and_value(tmp_path):
    root = tmp_path / "bad"
    save_rgb(root / "images" / "a.jpg", (10, 10))
    save_rgb(root / "images" / "b.jpg", (10, 10))
    (root / "masks").mkdir()
    Image.fromarray(np.full((10, 10), 3, np.uint8), mode="L").save(root / "masks" / "a.png")
    with pytest.raises(ImageReadError, match=r"masks/b\.png: mask file missing"):
        load_segmentation_data("folder", root, 3)
    Image.fromarray(np.zeros((10, 12), np.uint8), mode="L").save(root / "masks" / "b.png")
    with pytest.raises(ImageReadError, match=r"a\.png: class id 3 in mask, but --classes is 3"):
        read_class_mask(root / "masks" / "a.png", "index", 3)
    ds = SegmentationDataset([root / "images" / "b.jpg"], [root / "masks" / "b.png"], (8, 8), "index", 3)
    with pytest.raises(ImageReadError, match=r"b\.png: mask is 12x10 but image .*b\.jpg is 10x10"):
        ds[0]
    Image.fromarray(np.zeros((4, 4, 3), np.uint8), mode="RGB").save(root / "masks" / "rgb.png")
    with pytest.raises(ImageReadError, match=r"rgb\.png: mask is mode RGB"):
        read_class_mask(root / "masks" / "rgb.png", "index", 3)
    Image.fromarray(np.zeros((4, 4), np.uint8), mode="L").save(root / "masks" / "t.png")
    with pytest.raises(ImageReadError, match=r"t\.png: trimap value 0"):
        read_class_mask(root / "masks" / "t.png", "trimap", 3)
    with pytest.raises(DatasetLayoutError, match="nowhere: data folder does not exist"):
        load_segmentation_data("folder", tmp_path / "nowhere", 3)


def test_augmentation_keeps_label_values_and_leaves_labels_uncoloured(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24], mask[12:20, 12:20], mask[0, :] = 1, 2, 255
    aug = train_augmentation(seed=0)
    for _ in range(10):
        out = aug(image=image, mask=mask)
        assert set(np.unique(out["mask"])) <= {0, 1, 2, 255}  # nearest neighbour, no jitter


def test_demo_trimaps_have_car_background_and_a_border_band(tmp_path):
    root = write_demo_trimap_dataset(tmp_path / "demo", seed=1, n_cars=1, angles=2, size=(64, 96))
    masks = sorted((root / "masks").glob("*.png"))
    assert len(masks) == 2 and len(list((root / "images").glob("*.jpg"))) == 2
    mask = read_class_mask(masks[0], "index", 3)
    counts = np.bincount(mask.ravel(), minlength=3)
    assert counts.min() > 0 and counts[1] > counts[2]  # all three classes, border a thin band
    mtime = masks[0].stat().st_mtime_ns
    write_demo_trimap_dataset(tmp_path / "demo", seed=1, n_cars=1, angles=2, size=(64, 96))
    assert masks[0].stat().st_mtime_ns == mtime  # complete: not rewritten


def test_palette_pngs_at_each_images_size_resume_and_name_the_classes(tmp_path):
    from carvana.submission.masks import predict_to_masks
    from carvana.training.classifier import CarvanaClassifier
    from carvana.training.tasks import MultiClassTask

    for i, hw in enumerate([(20, 30), (17, 11)]):
        save_rgb(tmp_path / "imgs" / f"p{i}.jpg", hw, i)
    images = sorted((tmp_path / "imgs").glob("*.jpg"))
    model = torch.nn.Conv2d(3, 3, 1)
    torch.nn.init.zeros_(model.weight)
    with torch.no_grad():
        model.bias.copy_(torch.tensor([0.0, 0.0, 3.0]))
    clf = CarvanaClassifier(model, epochs=1, device="cpu", progress=False, task=MultiClassTask(3))
    out = tmp_path / "masks"
    assert predict_to_masks(clf, images, out, (16, 16), ["a", "b", "c"], batch_size=2, loader_workers=0, tag="w1") == 2
    png = Image.open(out / "p1.png")
    assert png.mode == "P" and png.size == (11, 17) and (np.asarray(png) == 2).all()
    assert png.getpalette()[:9] == PALETTE[:3].ravel().tolist()
    assert (out / "legend.png").exists() and (out / "classes.csv").read_text().splitlines()[3].startswith("2,c,")
    mtime = (out / "p0.png").stat().st_mtime_ns
    (out / "p1.png").unlink()  # as if interrupted after the first image
    assert predict_to_masks(clf, images, out, (16, 16), ["a", "b", "c"], batch_size=2, loader_workers=0, tag="w1") == 2
    assert (out / "p0.png").stat().st_mtime_ns == mtime and (out / "p1.png").exists()
    predict_to_masks(clf, images, out, (16, 16), ["a", "b", "c"], batch_size=2, loader_workers=0, tag="w2")
    assert (out / "p0.png").stat().st_mtime_ns != mtime  # other weights: redone


@pytest.mark.skipif(not (OXFORD / "images").is_dir(), reason=f"real data sample not present at {OXFORD}")
def test_real_oxford_pet_sample_reads_as_three_classes():
    data = load_segmentation_data("oxford-pet", OXFORD, 3, validation_size=0.2, seed=0)
    assert len(data.train_images) + len(data.valid_images) == 120 and len(data.valid_images) == 24
    ds = SegmentationDataset(data.valid_images[:2], data.valid_masks[:2], (64, 64), "trimap", 3, full_masks=True)
    item = ds[0]
    assert set(np.unique(item["full_mask"].numpy())) == {0, 1, 2} and item["image"].shape == (3, 64, 64)


@pytest.mark.skipif(not (CARLA / "CameraSeg").is_dir(), reason=f"real data sample not present at {CARLA}")
def test_real_carla_sample_class_ids_are_the_red_channel():
    import cv2

    data = load_segmentation_data("carla", CARLA, 13, validation_size=0.2, seed=0)
    assert len(data.train_images) + len(data.valid_images) == 50
    path = data.train_masks[0]
    mask = read_class_mask(path, "red", 13)
    np.testing.assert_array_equal(mask, cv2.imread(str(path))[..., 2])  # OpenCV: BGR, red is index 2
    assert mask.shape == (600, 800) and mask.max() <= 12 and mask[590, 400] == 10  # the ego hood is 'vehicles'
