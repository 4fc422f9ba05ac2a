"""Fast decoding: JPEGs read for a network at the DCT scale (1/2, 1/4, 1/8) that still covers its
input, resized with exact geometry; ``fast_decode=False`` gives a full decode + resize, exactly.

Bounds on the mean absolute difference (0-255 scale) from full decoding, measured when this
test was written (carvana.data.jpeg tabulates the real-photo figures):

* real photos (8 of carvana-sample/train): mean 1.03 / 0.66 / 0.40 over 48 photos at
  128x192 / 256x384 / 512x768, no photo above 1.36 / 0.99 / 0.60. Asserted: mean <= 1.3 / 0.9
  / 0.6, each photo <= 1.6 / 1.2 / 0.8.
* the synthetic JPEG below (blurred noise, a filled ellipse, a bar and text; quality 90):
  1.31 / 2.11 / 0.73 / 0.58 at 64x96 / 128x192 / 256x384 / 512x768. Asserted <= 1.7 / 2.6 /
  1.0 / 0.8 (+25-40%, room for another libjpeg build); odd-sized blurred noise 1.64 at most,
  asserted <= 2.2.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from carvana import segment
from carvana.data import datasets as ds_module
from carvana.data import jpeg
from carvana.data.class_datasets import SegmentationDataset
from carvana.data.datasets import (TestImageDataset, TrainImageDataset, image_to_tensor, read_image, resize,
                                   train_augmentation)
from carvana.data.jpeg import decode_scale
from carvana.data.layout import NATIVE_INPUT, ORIG_SHAPE
from carvana.data.photos import read_photo, to_network_input
from carvana.models.registry import ModelConfig, build_model
from carvana.submission.ensemble import EnsemblePredictor, Member, MultiSizeTestDataset, size_key
from carvana.submission.fingerprint import fingerprint_of, prediction_components
from carvana.submission.sharded import predict_to_submission, prediction_settings
from carvana.training.callbacks import CallbackList
from conftest import CARVANA_SAMPLE
from segment_helpers import use_bright_archs

SIZES = [(64, 96), (128, 192), (256, 384), (512, 768)]
SYNTHETIC_BOUND = {(64, 96): 1.7, (128, 192): 2.6, (256, 384): 1.0, (512, 768): 0.8}
REAL_MEAN_BOUND = {(128, 192): 1.3, (256, 384): 0.9, (512, 768): 0.6}
REAL_EACH_BOUND = {(128, 192): 1.6, (256, 384): 1.2, (512, 768): 0.8}


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A 1918x1280 JPEG with texture, flat regions and sharp edges."""
    rng = np.random.default_rng(0)
    img = cv2.normalize(cv2.GaussianBlur(rng.integers(0, 255, (*ORIG_SHAPE, 3), dtype=np.uint8), (0, 0), 6),
                        None, 0, 255, cv2.NORM_MINMAX)
    cv2.ellipse(img, (960, 700), (600, 300), 0, 0, 360, (30, 40, 200), -1)
    cv2.rectangle(img, (300, 900), (1600, 1000), (220, 220, 220), -1)
    cv2.putText(img, "CARVANA", (500, 400), cv2.FONT_HERSHEY_SIMPLEX, 6, (0, 0, 0), 12)
    path = tmp_path_factory.mktemp("photos") / "abc_01.jpg"
    cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return path


def mad(a, b) -> float:
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


# ----------------------------------------------------------------------------- the scale rule
@pytest.mark.parametrize("orig", [ORIG_SHAPE, (1280, 1280), (3000, 4000), (517, 333), (10, 10)])
def test_the_scale_is_the_largest_that_still_covers_the_input(orig):
    for th in (1, 8, 100, 128, 159, 160, 161, 256, 320, 321, 512, 640, 641, 1024, 1280):
        for tw in (1, 96, 192, 239, 240, 241, 384, 479, 480, 768, 959, 960, 1024, 1918):
            s = decode_scale(orig, (th, tw))
            assert s in (1, 2, 4, 8) and decode_scale(orig, (th, tw), fast=False) == 1
            assert s == 1 or (orig[0] // s >= th and orig[1] // s >= tw), (orig, th, tw, s)  # never smaller
            if s < 8:  # and the next scale would be
                assert orig[0] // (2 * s) < th or orig[1] // (2 * s) < tw, (orig, th, tw, s)


def test_native_size_and_its_crops_decode_in_full(photo, monkeypatch):
    assert decode_scale(ORIG_SHAPE, NATIVE_INPUT) == 1 and decode_scale((2560, 3840), NATIVE_INPUT) == 1
    assert [decode_scale(ORIG_SHAPE, s) for s in SIZES + [(1024, 1024)]] == [8, 8, 4, 2, 1]
    scales = []
    monkeypatch.setattr(ds_module, "read_image", lambda p, r=1: scales.append(r) or read_image(p, r))
    mask = photo.with_name("abc_01_mask.gif")
    Image.fromarray(np.ones(ORIG_SHAPE, np.uint8), mode="L").save(mask)
    crops = TrainImageDataset([photo], [mask], NATIVE_INPUT, train_augmentation(7, (256, 320), augment=False))
    assert crops[0]["image"].shape == (3, 256, 320) and scales == [1]
    assert TestImageDataset([photo], NATIVE_INPUT)[0]["ok"]


def test_odd_sized_jpegs_decode_to_the_rounded_up_size_and_fill_the_input(tmp_path):
    rng = np.random.default_rng(1)
    for h, w in ((517, 333), (1001, 1503), (64, 41)):
        path = tmp_path / f"odd{h}x{w}.jpg"
        cv2.imwrite(str(path), cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (0, 0), 3))
        for s in (2, 4, 8):
            assert read_image(path, s).shape[:2] == jpeg.decoded_size((h, w), s) == read_photo(path, s).shape[:2]
        hw = (64, 41)
        fast = TestImageDataset([path], hw)[0]["image"]
        assert fast.shape == (3, *hw) and mad(fast.permute(1, 2, 0), resize(read_image(path), hw)) <= 2.2  # measured 1.64 at most


# ----------------------------------------------------------------------------- closeness
@pytest.mark.parametrize("hw", SIZES)
def test_a_synthetic_jpeg_decodes_close_to_the_full_decode(photo, hw):
    fast = TestImageDataset([photo], hw)[0]["image"].permute(1, 2, 0).numpy()
    full = resize(read_image(photo), hw)
    assert mad(fast, full) <= SYNTHETIC_BOUND[hw]
    if hw == (256, 384):  # exact geometry beats resizing the 480 decoded columns to 384
        naive = cv2.resize(read_image(photo, 4), (384, 256), interpolation=cv2.INTER_LINEAR)
        assert mad(fast, full) < 0.9 * mad(naive, full)


def test_real_photos_decode_close_to_the_full_decode():
    photos = sorted((CARVANA_SAMPLE / "train").glob("*.jpg"))[::48]
    if not photos:
        pytest.skip(f"real data slice not present at {CARVANA_SAMPLE}: closeness checked on the synthetic JPEG only")
    for hw in REAL_MEAN_BOUND:
        fast = TestImageDataset(photos, hw)
        diffs = [mad(fast[i]["image"].permute(1, 2, 0).numpy(), resize(read_image(p), hw)) for i, p in enumerate(photos)]
        assert np.mean(diffs) <= REAL_MEAN_BOUND[hw] and max(diffs) <= REAL_EACH_BOUND[hw], (hw, diffs)


# ----------------------------------------------------------------------------- fast_decode=False
def test_every_reader_honours_fast_decode_off(photo, tmp_path):
    hw = (128, 192)
    full = image_to_tensor(resize(read_image(photo), hw))
    mask = tmp_path / "m.png"
    Image.fromarray(np.zeros(ORIG_SHAPE, np.uint8), mode="L").save(mask)
    Image.fromarray(np.zeros(ORIG_SHAPE, np.uint8), mode="P").save(tmp_path / "g.gif")
    readers = {
        "TrainImageDataset": lambda f: TrainImageDataset([photo], [tmp_path / "g.gif"], hw, fast_decode=f)[0]["image"],
        "TestImageDataset": lambda f: TestImageDataset([photo], hw, fast_decode=f)[0]["image"],
        "SegmentationDataset": lambda f: SegmentationDataset([photo], [mask], hw, "index", 2, fast_decode=f)[0]["image"],
        "MultiSizeTestDataset": lambda f: MultiSizeTestDataset([photo], [hw, (512, 768)], fast_decode=f)[0][size_key(hw)],
    }
    for name, read in readers.items():
        assert torch.equal(read(False), full), name
        assert not torch.equal(read(True), full), name  # the setting does change something here
        assert mad(read(True), full) <= SYNTHETIC_BOUND[hw], name


def test_an_ensemble_decodes_once_per_scale_and_gives_each_size_its_own_loader_pixels(photo, monkeypatch):
    sizes = [(128, 192), (160, 240), (256, 384), NATIVE_INPUT]  # scales 8, 8, 4, 1
    calls = []
    original = jpeg.read_image
    monkeypatch.setattr(jpeg, "read_image", lambda p, r=1: calls.append(r) or original(p, r))
    item = MultiSizeTestDataset([photo], sizes)[0]
    assert sorted(calls) == [1, 4, 8]
    for s in sizes:
        assert torch.equal(item[size_key(s)], TestImageDataset([photo], s)[0]["image"]), s
    calls.clear()
    MultiSizeTestDataset([photo], sizes, fast_decode=False)[0]
    assert calls == [1]


# ----------------------------------------------------------------------------- fingerprints
class FakeClassifier:
    """Predicts the mean brightness as the probability; records the datasets it was given."""

    device, amp_dtype, model_config = torch.device("cpu"), None, None

    def __init__(self, classes: int = 1) -> None:
        self.model, self.classes, self.datasets = torch.nn.Conv2d(3, 1, 1), classes, []

    def predict(self, loader, callbacks, tta=False):
        self.datasets.append(loader.dataset)
        cbs = CallbackList(callbacks)
        cbs.on_predict_start(self)
        for batch in loader:
            p = batch["image"].float().mean(1) / 255
            cbs.on_predict_batch_end(self, list(batch["name"]), p if self.classes == 1 else torch.stack([p, 1 - p], 1))
        cbs.on_predict_end(self)


def test_the_prediction_fingerprint_changes_with_the_setting(photo, tmp_path):
    clf = FakeClassifier()
    on, off = (prediction_settings(clf, (64, 96), False, f) for f in (True, False))
    assert on["fast_decode"] is True and off["fast_decode"] is False
    assert fingerprint_of(prediction_components(["a"], 2, 0.5, settings=on)) != \
        fingerprint_of(prediction_components(["a"], 2, 0.5, settings=off))
    config = ModelConfig(arch="unet1024", width=0.125, input_size=(64, 96))
    member = lambda w: Member(Path("m.pt"), SimpleNamespace(device=torch.device("cpu"), amp_dtype=None, streams=1),  # noqa: E731
                              config, w, "sha256 x")
    two = EnsemblePredictor([member(0.5), member(0.5)], progress=False)
    assert two.prediction_settings((64, 96), False)["fast_decode"] is True
    assert two.prediction_settings((64, 96), False, fast_decode=False)["fast_decode"] is False
    # A submission made with one setting is not taken as complete (nor resumed) for the other.
    images, out = [photo], tmp_path / "sub.csv.gz"
    for fast, predicts in ((True, True), (False, True), (False, False)):
        before = len(clf.datasets)
        predict_to_submission(clf, images, out, (64, 96), chunk_size=2, loader_workers=0, fast_decode=fast)
        assert (len(clf.datasets) > before) == predicts, fast
        if predicts:
            assert clf.datasets[-1].fast_decode is fast


def test_oof_scoring_and_palette_masks_pass_the_setting_on(photo, tmp_path):
    from carvana.submission.masks import predict_to_masks
    from carvana.training.oof import score_fold

    clf = FakeClassifier()
    gif = tmp_path / "g.gif"
    Image.fromarray(np.ones(ORIG_SHAPE, np.uint8), mode="P").save(gif)
    for fast in (True, False):
        score_fold(clf, [photo], [gif], (64, 96), [0.5], tta=False, fast_decode=fast)
        assert clf.datasets[-1].fast_decode is fast
    clf = FakeClassifier(classes=2)
    out = tmp_path / "masks"
    for fast in (True, False):
        assert predict_to_masks(clf, [photo], out, (16, 24), ["a", "b"], loader_workers=0, fast_decode=fast) == 1
        assert clf.datasets[-1].fast_decode is fast  # the other setting's masks were not reused
    assert '"fast_decode": false' in (out / ".fingerprint").read_text()


# ----------------------------------------------------------------------------- segment
def test_segment_decodes_jpegs_at_scale_keeps_orientation_and_can_be_turned_off(photo, tmp_path, monkeypatch):
    use_bright_archs(monkeypatch)
    assert segment.build_parser().parse_args(["x", "--checkpoint", "c", "-o", "o"]).fast_decode is True
    assert segment.build_parser().parse_args(["x", "--checkpoint", "c", "-o", "o", "--no-fast-decode"]).fast_decode is False
    config = ModelConfig(arch="test_bright", input_size=(64, 96))
    fast, full = (segment.Segmenter(build_model(config), config, device="cpu", fast_decode=f) for f in (True, False))
    # A portrait phone photo: stored landscape, EXIF Orientation 6 (rotate 90 degrees clockwise to view).
    raw = Image.open(photo)
    exif = raw.getexif()
    exif[0x0112] = 6
    rotated = tmp_path / "phone.jpg"
    raw.save(rotated, exif=exif, quality=90)
    png = tmp_path / "lossless.png"
    raw.save(png)
    for path in (photo, rotated, png):
        rgb = read_photo(path)
        expected, box = to_network_input(rgb, (64, 96))
        got_full, box_full = full.prepare(rgb, path)
        got_fast, box_fast = fast.prepare(rgb, path)
        np.testing.assert_array_equal(got_full, expected)
        assert box_full == box_fast == box
        if path == png:  # not a JPEG: decoded in full either way
            np.testing.assert_array_equal(got_fast, expected)
        else:
            assert not np.array_equal(got_fast, expected) and mad(got_fast, expected) <= SYNTHETIC_BOUND[(64, 96)], path
    assert read_photo(rotated).shape == (1918, 1280, 3) and read_photo(rotated, 4).shape == (480, 320, 3)
