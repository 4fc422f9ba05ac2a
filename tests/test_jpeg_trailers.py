"""JPEGs with bytes after the end-of-image marker (phone/camera trailers) are read; truncated ones are not."""

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from carvana.data.datasets import ImageReadError, TestImageDataset, read_image
from carvana.data.photos import PhotoError, read_photo

TRAILER = b"SEFT\x00\x01\x02" * 40 + b"\x00" * 100  # what Samsung-style trailers look like: tags and zeros


def write_jpeg(path: Path, hw=(48, 64)) -> np.ndarray:
    rng = np.random.default_rng(0)
    rgb = (rng.random(hw + (3,)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(path, quality=95)
    return np.asarray(Image.open(path).convert("RGB"))


def with_comment(data: bytes, payload: bytes) -> bytes:
    """``data`` with a COM segment holding ``payload`` right after SOI (like an EXIF thumbnail's bytes)."""
    return data[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


def test_bytes_after_the_end_of_image_marker_are_accepted(tmp_path):
    # Fails on the old code: only the last 64 bytes were searched for FF D9.
    path = tmp_path / "phone_01.jpg"
    expected = write_jpeg(path)
    path.write_bytes(path.read_bytes() + TRAILER)
    image = read_image(path)
    assert image.shape == (48, 64, 3)
    np.testing.assert_array_equal(image, cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB))
    assert np.abs(image.astype(int) - expected).mean() < 3  # the photo, not a grey fill
    item = TestImageDataset([path], (32, 32))[0]
    assert item["ok"] is True
    np.testing.assert_array_equal(read_photo(path), expected)  # the segment CLI's reader agrees


@pytest.mark.parametrize("cut", [2, 40, "half"])
def test_truncated_jpegs_are_still_rejected(tmp_path, cut):
    path = tmp_path / "cut_01.jpg"
    write_jpeg(path)
    data = path.read_bytes()
    keep = len(data) // 2 if cut == "half" else len(data) - cut
    path.write_bytes(data[:keep])
    with pytest.raises(ImageReadError, match="cut_01.jpg: truncated JPEG"):
        read_image(path)
    with pytest.warns(UserWarning, match="cut_01.jpg"):
        assert TestImageDataset([path], (32, 32))[0]["ok"] is False
    if cut != 2:  # PIL decodes a file that lacks only the 2-byte EOI (all pixel data present)
        with pytest.raises(PhotoError, match="cut_01.jpg"):
            read_photo(path)


def test_an_end_of_image_marker_inside_the_header_does_not_hide_truncation(tmp_path):
    # An EXIF thumbnail (here a comment segment) carries its own FF D8 ... FF D9.
    path = tmp_path / "thumb_01.jpg"
    write_jpeg(path)
    data = with_comment(path.read_bytes(), b"thumbnail \xff\xd8 pixels \xff\xd9")
    path.write_bytes(data)
    assert read_image(path).shape == (48, 64, 3)
    path.write_bytes(data[: len(data) - 50])
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(path)
    path.write_bytes(data[:30])  # cut inside the header
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(path)
