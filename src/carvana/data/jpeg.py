"""Reading photos for a network: the DCT decode scale, OpenCV decoding, header size, truncation.

libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 of its size straight from the DCT coefficients
(``cv2.IMREAD_REDUCED_COLOR_N``; PIL's ``Image.draft``), several times faster than a full
decode followed by a large downscale. :func:`decode_scale` is the one rule every reader of
photos for a network uses (training, validation, OOF, prediction, ensembles, ``segment``):
the largest scale whose decoded size still covers the network's input in both dimensions,
or 1 (a full decode) when the setting is off (``fast=False``: ``--no-fast-decode``), at the
native input size (the frame is padded, never resized; crops are taken from that full frame)
and for files that are not JPEGs. Masks (GIF / RLE) never come through here.

The decoded image is then resized with the frame's exact geometry by
:func:`carvana.data.resizing.resize_decoded` (bilinear below a 2x shrink of the decoded
image, area above). Mean absolute difference (0-255 scale, over 3 channels) from a full
decode followed by ``resizing.resize``, on 48 real 1918x1280 Carvana photos (every 8th of
carvana-sample/train), per input size (scale):

==============  =====  ===========  ===========  =============  ============  ============
input           scale  chosen:      bilinear to  area to the    area, exact   bicubic,
                       bilinear,    the target   target size    geometry      exact
                       exact        size                                      geometry
                       geometry
==============  =====  ===========  ===========  =============  ============  ============
64x96           1/8    0.51 (area)  1.71         0.71           0.51          2.59
128x192         1/8    1.03         1.19         1.25           1.09          1.09
256x384         1/4    0.66         0.97         0.99           0.68          0.71
512x768         1/2    0.40         0.40         0.38           0.38          0.48
1024x1024       1      0            0            0.21           0.21          0.27
==============  =====  ===========  ===========  =============  ============  ============

"Exact geometry" scales by ``target * s / frame`` instead of ``target / decoded size``: the
decoded width of a 1918-wide frame is rounded up (480 at 1/4), so resizing those 480
columns to the target shifts the right-hand side of the picture by up to 0.4 output pixels;
that shift is most of the difference at 1/4 and 1/8 (1918 is a multiple of 2, so 1/2 is
unaffected). Bilinear wins at 128x192 and 256x384, area by 0.02 at 512x768.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from carvana.data.layout import is_native

DCT_SCALES = (1, 2, 4, 8)
# Pixels in the file's own (raw) orientation, EXIF Orientation ignored: masks are stored in that
# orientation and jpeg_size reports it, so image, mask and predicted mask sizes all agree.
_REDUCED_FLAGS = {f: flag | cv2.IMREAD_IGNORE_ORIENTATION for f, flag in (
    (1, cv2.IMREAD_COLOR), (2, cv2.IMREAD_REDUCED_COLOR_2), (4, cv2.IMREAD_REDUCED_COLOR_4), (8, cv2.IMREAD_REDUCED_COLOR_8))}


class ImageReadError(ValueError):
    """An image or mask file that cannot be used, with the file named in the message."""


def decode_scale(orig_hw: tuple[int, int], target_hw: tuple[int, int], fast: bool = True) -> int:
    """The DCT scale denominator (1, 2, 4 or 8) to decode an ``orig_hw`` JPEG at for a network
    input (or letterbox box) of ``target_hw``: the largest whose decoded size, ``orig // scale``
    rounded down, still covers the target in both dimensions. 1 when ``fast`` is off, and at
    the native input size (padded, not resized: crops come from the full frame).

    Decoding at 1/4 is ~5x faster than at full size, and since the image is downscaled anyway
    the result stays close to a full decode (see this module's docstring for the numbers).
    """
    if not fast or is_native(target_hw):
        return 1
    scale = 1
    for f in DCT_SCALES[1:]:
        if orig_hw[0] // f >= target_hw[0] and orig_hw[1] // f >= target_hw[1]:
            scale = f
    return scale


def decoded_size(orig_hw: tuple[int, int], scale: int) -> tuple[int, int]:
    """(H, W) libjpeg gives for an ``orig_hw`` JPEG decoded at 1/``scale``: each side rounded up."""
    return -(-orig_hw[0] // scale), -(-orig_hw[1] // scale)


def is_jpeg(data: bytes | np.ndarray) -> bool:
    """True when the bytes start with the JPEG start-of-image marker (FF D8)."""
    return len(data) >= 2 and int(data[0]) == 0xFF and int(data[1]) == 0xD8


def jpeg_truncated(data: bytes) -> bool:
    """True when a JPEG has no end-of-image marker (FF D9) after its first scan header.

    Bytes after the EOI (trailers phones and cameras append) are fine. The search starts at
    the first scan (SOS) because an EXIF thumbnail in the header has an EOI of its own; in
    entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so FF D9 there
    is the image's EOI.
    """
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers carry no length
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
            if marker == 0xDA:
                return data.rfind(b"\xff\xd9", i) < 0
    if i + 4 > len(data):  # the file ends inside the header
        return True
    return data.rfind(b"\xff\xd9", 2) < 0  # an odd header libjpeg may still read: any EOI will do


def read_image(path: Path, reduction: int = 1) -> np.ndarray:
    """Read an image as RGB uint8 (H, W, 3); a JPEG at 1/``reduction`` (DCT scaling, each side
    rounded up), any other format in full whatever ``reduction`` says; clear error if unusable.

    The pixels keep the file's raw orientation (EXIF Orientation is not applied), as masks do.
    """
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read image file ({exc.strerror})") from exc
    jpeg = is_jpeg(data)
    # libjpeg decodes a truncated file into a half-grey image with only a warning on
    # stderr; the JPEG end-of-image marker is the reliable check.
    if jpeg and jpeg_truncated(data.tobytes()):
        raise ImageReadError(f"{path}: truncated JPEG (no end-of-image marker after the image data)")
    # OpenCV would decode another format in full and then shrink it crudely: never ask it to.
    bgr = cv2.imdecode(data, _REDUCED_FLAGS[reduction if jpeg else 1])
    if bgr is None:
        raise ImageReadError(f"{path}: not a readable image (empty, corrupt or unsupported format)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def jpeg_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image from its header alone (PIL reads no pixel data here), raw orientation
    (EXIF ignored), as :func:`read_image` decodes it."""
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except (OSError, SyntaxError) as exc:
        raise ImageReadError(f"{path}: not a readable image ({exc})") from exc


def read_scaled(path: Path, orig_hw: tuple[int, int], scale: int) -> np.ndarray:
    """:func:`read_image` at 1/``scale`` of a frame whose header says ``orig_hw``; an
    ImageReadError when the pixels are neither that size nor its DCT-reduced size."""
    image = read_image(path, scale)
    if tuple(image.shape[:2]) not in (tuple(orig_hw), decoded_size(orig_hw, scale)):
        raise ImageReadError(f"{path}: decodes to {image.shape[1]}x{image.shape[0]}, its header says "
                             f"{orig_hw[1]}x{orig_hw[0]}")
    return image


def read_for_input(path: Path, hw: tuple[int, int], fast_decode: bool = True) -> tuple[np.ndarray, tuple[int, int]]:
    """(decoded RGB image, the frame's (H, W)) of an image read for a network input of ``hw``:
    a JPEG at :func:`decode_scale`'s scale for its own header size (1/8 .. full; full when
    ``fast_decode`` is off), anything else in full; ``resizing.fit_decoded`` brings it to ``hw``."""
    orig_hw = jpeg_size(path)
    return read_scaled(path, orig_hw, decode_scale(orig_hw, hw, fast_decode)), orig_hw
