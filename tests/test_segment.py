"""python -m carvana.segment: photos of any size/mode/orientation -> masks, cutouts, overlays."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from carvana import segment
from carvana.models.unet_original import mirror_pad
from carvana.training.checkpoint import threshold_of
from carvana.data.photos import Box, fit_box, probabilities_to_mask, read_photo, to_network_input
from carvana.training.checkpoint import load_model
from segment_helpers import bright, tiny_unet, use_bright_archs


@pytest.fixture(autouse=True)
def _bright_archs(monkeypatch):
    use_bright_archs(monkeypatch)


def run(*argv) -> int:
    return segment.main([str(a) for a in argv] + ["--no-progress"])


def load(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).copy()


def shape_photo(h: int, w: int, mode: str = "RGB") -> Image.Image:
    """A white ellipse-ish block on black, h x w: the 'bright' net's car."""
    a = np.zeros((h, w, 3), np.uint8)
    a[h // 4: 3 * h // 4, w // 5: 4 * w // 5] = 255
    return Image.fromarray(a).convert(mode)


@pytest.fixture(scope="module")
def unet_ckpt(tmp_path_factory) -> Path:
    return tiny_unet(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def test_odd_sizes_and_modes_give_full_resolution_masks_and_exact_cutouts(tmp_path, unet_ckpt):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    noise = lambda h, w: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    noise(517, 333).save(src / "portrait.jpg")          # 333 wide, 517 high
    noise(333, 517).save(src / "landscape.png")
    noise(40, 41).convert("L").save(src / "gray.png")
    rgba = noise(50, 70).convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (50, 70), dtype=np.uint8)))
    rgba.save(src / "rgba.png")
    noise(90, 64).save(src / "web.webp", lossless=True)
    noise(30, 20).convert("P").save(src / "palette.png")
    assert run("--checkpoint", unet_ckpt, src, "-o", tmp_path / "out") == 0
    for name, (h, w) in {"portrait": (517, 333), "landscape": (333, 517), "gray": (40, 41), "rgba": (50, 70),
                         "web": (90, 64), "palette": (30, 20)}.items():
        mask = load(tmp_path / "out" / f"{name}_mask.png")
        cutout = load(tmp_path / "out" / f"{name}_cutout.png")
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}, name
        assert cutout.shape == (h, w, 4), name
        np.testing.assert_array_equal(cutout[..., 3], mask, err_msg=name)  # alpha is the mask
        photo = next(src.glob(name + ".*"))
        np.testing.assert_array_equal(cutout[..., :3], read_photo(photo), err_msg=name)  # colours untouched


def test_rgba_photo_is_composited_on_white_and_gray_becomes_rgb(tmp_path):
    rgba = Image.new("RGBA", (4, 3), (10, 20, 30, 0))
    rgba.save(tmp_path / "t.png")
    np.testing.assert_array_equal(read_photo(tmp_path / "t.png"), np.full((3, 4, 3), 255, np.uint8))
    Image.new("L", (5, 2), 77).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_photo(tmp_path / "g.png"), np.full((2, 5, 3), 77, np.uint8))
    Image.fromarray(np.full((3, 2), 65535, np.uint16)).save(tmp_path / "g16.png")
    np.testing.assert_array_equal(read_photo(tmp_path / "g16.png"), np.full((3, 2, 3), 255, np.uint8))


@pytest.mark.parametrize("fit", ["letterbox", "stretch"])
@pytest.mark.parametrize("margin", [False, True])
@pytest.mark.parametrize("hw", [(517, 333), (333, 517), (120, 1000)])
def test_masks_land_where_the_car_is(tmp_path, fit, margin, hw):
    """Probabilities mapped back through the letterbox (and a valid-conv margin) hit the shape."""
    ckpt = bright(tmp_path / "b.pt", margin=margin)
    model, config, _ = load_model(ckpt)
    seg = segment.Segmenter(model, config, device="cpu", fit=fit)
    photo = np.asarray(shape_photo(*hw))
    net_input, box = seg.prepare(photo)
    assert net_input.shape == (64, 96, 3)
    prob = seg.probabilities(net_input[None])[0]
    mask = probabilities_to_mask(prob, box, hw, 0.5)
    truth = photo[..., 0] > 127
    # Right to within one network pixel (in photo pixels) everywhere: no shift, no scale error.
    k = int(np.ceil(max(hw[0] / box.height, hw[1] / box.width)))
    kernel = np.ones((2 * k + 1, 2 * k + 1), np.uint8)
    inner, outer = cv2.erode(truth.astype(np.uint8), kernel) > 0, cv2.dilate(truth.astype(np.uint8), kernel) > 0
    assert mask[inner].all() and not mask[~outer].any()
    assert inner.sum() > 0.5 * truth.sum()


def test_fit_box_letterboxes_centred_and_keeps_aspect():
    assert fit_box((1280, 1918), (256, 384)) == Box(0, 0, 256, 384)  # Carvana's aspect: no padding
    assert fit_box((517, 333), (64, 96)) == Box(0, 27, 64, 41)
    assert fit_box((10, 1000), (64, 96)) == Box(31, 0, 1, 96)
    assert fit_box((517, 333), (64, 96), "stretch") == Box(0, 0, 64, 96)
    out, box = to_network_input(np.full((517, 333, 3), 9, np.uint8), (72, 104), margin=4)
    assert out.shape == (72, 104, 3) and box == Box(0, 27, 64, 41) and (out == 9).all()  # edge-replicated padding


def test_valid_convolution_margin_is_mirrored_as_in_training():
    # A photo already at the output grid's size (no resize): the network input must be the
    # training path's mirror padding of it, edge not repeated, even where the margin exceeds
    # the side (mirrored in rounds).
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out, box = to_network_input(photo, (20 + 2 * 24, 30 + 2 * 24), margin=24, fit="stretch")
    expected = mirror_pad(torch.from_numpy(photo).permute(2, 0, 1)[None].float(), 24)[0].permute(1, 2, 0)
    assert box == Box(0, 0, 20, 30)
    assert np.array_equal(out, expected.to(torch.uint8).numpy())
    assert np.array_equal(out[24, 23], photo[0, 1])  # mirrored, not the edge pixel repeated


def test_exif_orientation_is_applied(tmp_path, unet_ckpt):
    raw = np.zeros((40, 60, 3), np.uint8)  # stored landscape 60x40 ...
    raw[:, :10] = 255                       # ... with a white band on the stored left
    exif = Image.Exif()
    exif[0x0112] = 6                        # "rotate 90 CW to display": the photo is 40 wide, 60 high
    buf = io.BytesIO()
    Image.fromarray(raw).save(buf, "JPEG", exif=exif, quality=95)
    (tmp_path / "rot.jpg").write_bytes(buf.getvalue())
    assert run("--checkpoint", unet_ckpt, tmp_path / "rot.jpg", "-o", tmp_path / "out") == 0
    mask, cutout = load(tmp_path / "out" / "rot_mask.png"), load(tmp_path / "out" / "rot_cutout.png")
    assert mask.shape == (60, 40) and cutout.shape == (60, 40, 4)
    with Image.open(tmp_path / "rot.jpg") as im:
        upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    np.testing.assert_array_equal(cutout[..., :3], upright)
    assert cutout[:10, :, :3].mean() > 200 and cutout[-20:, :, :3].mean() < 50  # the band is now on top


def test_overlay_and_background_outputs(tmp_path):
    ckpt = bright(tmp_path / "b.pt")
    shape_photo(200, 300).save(tmp_path / "car.png")
    assert run("--checkpoint", ckpt, tmp_path / "car.png", "-o", tmp_path / "col", "--overlay", "--background", "#3366aa") == 0
    mask = load(tmp_path / "col" / "car_mask.png") > 0
    overlay, composite = load(tmp_path / "col" / "car_overlay.jpg"), load(tmp_path / "col" / "car_background.jpg")
    assert overlay.shape == composite.shape == (200, 300, 3)
    greenish = (overlay[..., 1] > 180) & (overlay[..., 0] < 100) & (overlay[..., 2] < 100)
    ys, xs = np.nonzero(greenish)
    # An outline along the mask's border (the white block spans rows 50..149, columns 60..239), not a fill.
    assert greenish.sum() > 400 and not greenish[70:130, 80:220].any() and not greenish[:40].any()
    assert abs(ys.min() - 50) <= 3 and abs(ys.max() - 149) <= 3 and abs(xs.min() - 60) <= 3 and abs(xs.max() - 239) <= 3
    assert np.abs(composite[~mask].astype(int) - [0x33, 0x66, 0xAA]).mean() < 3  # JPEG: close to the colour
    assert composite[100, 150].min() > 240  # the car stays white
    # A picture as background: scaled to cover the photo.
    Image.new("RGB", (50, 20), (200, 10, 10)).save(tmp_path / "red.png")
    assert run("--checkpoint", ckpt, tmp_path / "car.png", "-o", tmp_path / "pic", "--background", tmp_path / "red.png") == 0
    composite = load(tmp_path / "pic" / "car_background.jpg")
    assert np.abs(composite[~mask].astype(int) - [200, 10, 10]).mean() < 3
    assert run("--checkpoint", ckpt, tmp_path / "car.png", "-o", tmp_path / "x", "--background", "notacolour") == 2


def test_corrupt_and_missing_files_warn_and_the_run_goes_on(tmp_path, unet_ckpt):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (70, 50), (1, 2, 3)).save(src / "good.jpg")
    (src / "text.jpg").write_text("not an image")
    good = (src / "good.jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (src / "notes.txt").write_text("ignored: not an image suffix")
    with pytest.warns(UserWarning) as caught:
        status = run("--checkpoint", unet_ckpt, src, tmp_path / "missing.png", "-o", tmp_path / "out")
    assert status == 3
    text = "\n".join(str(w.message) for w in caught)
    for name in ("text.jpg", "truncated.jpg", "missing.png"):
        assert name in text
    assert "notes.txt" not in text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good_cutout.png", "good_mask.png"]


def test_rerun_skips_existing_outputs_and_overwrite_redoes_them(tmp_path, unet_ckpt, capsys):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    Image.new("RGB", (70, 50), (1, 2, 3)).save(src / "a.jpg")
    Image.new("RGB", (30, 50), (9, 2, 3)).save(src / "sub" / "b.png")
    out = src / "out"  # inside the input folder: outputs must not become inputs
    assert run("--checkpoint", unet_ckpt, src, "-o", out) == 0
    files = sorted(out.rglob("*.png"))
    assert [p.relative_to(out).as_posix() for p in files] == ["a_cutout.png", "a_mask.png", "sub/b_cutout.png", "sub/b_mask.png"]
    stamps = {p: p.stat().st_mtime_ns for p in files}
    capsys.readouterr()
    assert run("--checkpoint", unet_ckpt, src, "-o", out) == 0
    err = capsys.readouterr().err
    assert "wrote 0 photo(s)" in err and "2 already done" in err
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    (out / "a_cutout.png").unlink()  # an interrupted photo is redone
    assert run("--checkpoint", unet_ckpt, src, "-o", out) == 0
    assert (out / "a_cutout.png").is_file() and (out / "sub" / "b_mask.png").stat().st_mtime_ns == stamps[out / "sub" / "b_mask.png"]
    assert run("--checkpoint", unet_ckpt, src, "-o", out, "--overwrite") == 0
    assert (out / "sub" / "b_mask.png").stat().st_mtime_ns != stamps[out / "sub" / "b_mask.png"]
    assert not list(out.rglob("*.tmp"))


def test_tta_prediction_is_mirror_symmetric(unet_ckpt):
    model, config, _ = load_model(unet_ckpt)
    seg = segment.Segmenter(model, config, device="cpu", tta=True)
    x = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    p, p_flipped = seg.probabilities(x), seg.probabilities(x[:, :, ::-1])
    np.testing.assert_allclose(p, p_flipped[:, :, ::-1], atol=1e-6)
    assert not np.allclose(p, segment.Segmenter(model, config, device="cpu").probabilities(x), atol=1e-4)


def test_usage_errors(tmp_path, capsys):
    multi = tiny_unet(tmp_path / "multi.pt", classes=3)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert run("--checkpoint", multi, tmp_path / "a.png", "-o", tmp_path / "out") == 2
    assert "3 classes" in capsys.readouterr().err
    assert run("--checkpoint", tmp_path / "nope.pt", tmp_path / "a.png", "-o", tmp_path / "out") == 2
    assert "nope.pt" in capsys.readouterr().err
    (tmp_path / "d").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "a.jpg")
    assert run("--checkpoint", multi, tmp_path / "a.png", tmp_path / "d", "-o", tmp_path / "out") == 2
    assert "same output files" in capsys.readouterr().err


def test_reading_ahead_is_bounded():
    """Memory stays flat for any number of photos: at most `ahead` photos are read but not consumed."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    started, consumed, worst = [0], 0, 0
    lock = threading.Lock()

    def job(i):
        with lock:
            started[0] += 1
        return i

    with ThreadPoolExecutor(4) as pool:
        for i in segment._bounded_map(pool, job, ((i,) for i in range(200)), ahead=6):
            assert i == consumed  # in order
            consumed += 1
            with lock:
                worst = max(worst, started[0] - consumed)
    assert consumed == 200 and worst <= 6


def test_threshold_comes_from_the_checkpoint_run_when_it_is_a_number():
    assert threshold_of({"hparams": {"threshold": 0.3}}) == 0.3
    assert threshold_of({"hparams": {"threshold": "auto"}}) == 0.5
    assert threshold_of({"hparams": {"threshold": 7}}) == 0.5
    assert threshold_of({}) == 0.5


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        segment.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--checkpoint", "--overlay", "--background", "--tta", "--overwrite", "--fit"):
        assert flag in out
