"""python -m carvana.export: ONNX with the normalisation inside, parity with PyTorch, the docs snippet."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carvana import export, segment
from carvana.training.checkpoint import load_model
from carvana.models.registry import ModelConfig
from segment_helpers import bright, save_model, tiny_unet, use_bright_archs

SNIPPET_DOC = Path(__file__).resolve().parents[1] / "docs" / "segment-export.md"


@pytest.fixture(autouse=True)
def _bright_archs(monkeypatch):
    use_bright_archs(monkeypatch)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny UNet1024 (64x64) exported with dynamic H/W through the CLI."""
    d = tmp_path_factory.mktemp("onnx")
    ckpt = tiny_unet(d / "tiny.pt")
    assert export.main(["--checkpoint", str(ckpt), "-o", str(d / "tiny.onnx"), "--dynamic-hw"]) == 0
    return ckpt, d / "tiny.onnx"


def test_onnx_matches_pytorch_on_generated_inputs(exported, capsys):
    ckpt, onnx_path = exported
    model, config, _ = load_model(ckpt)
    rng = np.random.default_rng(0)
    for batch, hw in [(1, (64, 64)), (5, (64, 64)), (2, (128, 192))]:  # dynamic batch, dynamic H/W
        images = rng.integers(0, 256, (batch, 3, *hw), dtype=np.uint8)
        result = export.onnx_parity(model, config, onnx_path, images)
        assert result["max_abs_diff"] < export.PARITY_TOLERANCE, result
        assert result["mask_pixels_differing"] == 0, result
    # The graph takes uint8 and gives probabilities; the checks are not vacuous: probabilities spread over (0, 1).
    import onnxruntime as ort
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    prob = session.run(None, {"image": rng.integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)})[0]
    assert prob.shape == (2, 1, 64, 64) and prob.min() >= 0 and prob.max() <= 1 and prob.std() > 1e-3


def test_metadata_describes_the_model(exported):
    _, onnx_path = exported
    meta = export.read_model_metadata(onnx_path)
    assert meta["input_size"] == "64x64" and float(meta["threshold"]) == 0.5
    assert meta["classes"] == "1" and meta["size_multiple"] == "64" and meta["dynamic_hw"] == "true"
    assert '"width": 0.125' in meta["model_config"]


def test_fixed_size_export_and_stored_threshold(tmp_path):
    ckpt = save_model(tmp_path / "b.pt", ModelConfig(arch="test_bright", input_size=(64, 96)), hparams={"threshold": 0.3})
    assert export.main(["--checkpoint", str(ckpt), "-o", str(tmp_path / "m.onnx")]) == 0
    meta = export.read_model_metadata(tmp_path / "m.onnx")
    assert meta["threshold"] == "0.3" and meta["dynamic_hw"] == "false"
    import onnxruntime as ort
    shape = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).get_inputs()[0].shape
    assert shape[1:] == [3, 64, 96] and not isinstance(shape[0], int)
    assert export.main(["--checkpoint", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "x.onnx")]) == 2
    assert not list(tmp_path.glob(".*tmp"))


def test_onnx_parity_on_real_sample_photos(exported, carvana_sample):
    ckpt, onnx_path = exported
    model, config, _ = load_model(ckpt)
    photos = sorted((carvana_sample / "test").glob("*.jpg"))[:8]
    images = export.photo_inputs(photos, config)
    assert images.shape == (8, 3, 64, 64)
    result = export.onnx_parity(model, config, onnx_path, images)
    assert result["max_abs_diff"] < export.PARITY_TOLERANCE and result["mask_pixels_differing"] == 0, result


def docs_snippet() -> str:
    text = SNIPPET_DOC.read_text()
    match = re.search(r"<!-- onnx-snippet -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/segment-export.md lost its onnxruntime snippet (marked <!-- onnx-snippet -->)"
    return match.group(1)


def test_readme_onnx_snippet_runs_without_the_package(tmp_path):
    """The docs snippet, run with torch, cv2 and carvana unimportable, matches segment's mask."""
    ckpt = bright(tmp_path / "b.pt")
    assert export.main(["--checkpoint", str(ckpt), "-o", str(tmp_path / "m.onnx")]) == 0
    photo = np.zeros((517, 333, 3), np.uint8)
    photo[100:400, 50:300] = 255
    Image.fromarray(photo).save(tmp_path / "car.png")
    (tmp_path / "snippet.py").write_text(docs_snippet())
    blocker = ("import sys; [sys.modules.__setitem__(m, None) for m in ('torch', 'cv2', 'carvana')]; "
               "sys.argv = ['snippet.py', 'm.onnx', 'car.png']; exec(open('snippet.py').read())")
    subprocess.run([sys.executable, "-c", blocker], cwd=tmp_path, check=True, timeout=120)
    with Image.open(tmp_path / "car_mask.png") as im:
        theirs = np.asarray(im) > 127
    with Image.open(tmp_path / "car_cutout.png") as im:
        cutout = np.asarray(im)
    np.testing.assert_array_equal(cutout[..., 3] > 127, theirs)
    assert segment.main(["--checkpoint", str(ckpt), str(tmp_path / "car.png"), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    with Image.open(tmp_path / "out" / "car_mask.png") as im:
        ours = np.asarray(im) > 127
    assert theirs.shape == ours.shape == (517, 333)
    assert (theirs != ours).mean() < 0.01  # PIL vs OpenCV resampling may move an edge by a pixel
    assert abs(int(theirs.sum()) - 300 * 250) < 0.05 * 300 * 250


def test_multiclass_export_gives_softmax_probabilities(tmp_path):
    ckpt = tiny_unet(tmp_path / "multi.pt", classes=3, input_size=(64, 64))
    assert export.main(["--checkpoint", str(ckpt), "-o", str(tmp_path / "m.onnx")]) == 0
    model, config, _ = load_model(ckpt)
    images = np.random.default_rng(2).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    result = export.onnx_parity(model, config, tmp_path / "m.onnx", images)
    assert result["max_abs_diff"] < export.PARITY_TOLERANCE and result["mask_pixels_differing"] == 0, result
    import onnxruntime as ort
    prob = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": images})[0]
    assert prob.shape == (2, 3, 64, 64)
    np.testing.assert_allclose(prob.sum(1), 1.0, atol=1e-5)  # softmax over the classes
    assert export.read_model_metadata(tmp_path / "m.onnx")["classes"] == "3"
