"""The engine test cases, run by tests/test_engines.py in a process of their own.

--engine: OpenVINO and ONNX Runtime run the whole prediction step (uint8 in, normalisation,
mirror margin, flip TTA in one batch, activation, average) as one compiled graph.

Parity on networks made here: every engine's probabilities are within 1e-3 (mean absolute)
of the torch path's in fp32, and the masks agree; the compiled model is cached on disk under a
key of the weights and settings, rebuilt when corrupt; a failed compile falls back to torch
with one line under auto and is one error when the engine was asked for by name.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from carvana.models.registry import build_model, make_config
from carvana.submission.fingerprint import weights_digest
from carvana.training import engines
from carvana.training.classifier import CarvanaClassifier
from carvana.training.engines import EngineError, attach_engine, choose_engine
from carvana.training.evaluation import batch_probabilities
from carvana.training.tasks import MultiClassTask

MAIN = Path(__file__).resolve().parents[1] / "main.py"
NETWORKS = [("unet1024", 1, (64, 128), 0.125), ("unet-original", 1, (36, 36), 0.125), ("unet1024", 3, (64, 64), 0.125)]


def classifier(arch, classes, size, width, amp=False, streams=2):
    torch.manual_seed(0)
    config = make_config(arch, width, classes, size)
    model = build_model(config, pretrained=False)
    task = MultiClassTask(classes, [str(i) for i in range(classes)]) if classes > 1 else None
    return CarvanaClassifier(model, epochs=1, model_config=config, device="cpu", amp=amp, eval_streams=streams,
                             task=task)


@pytest.mark.parametrize("engine", ["openvino", "onnxruntime"])
@pytest.mark.parametrize("arch, classes, size, width", NETWORKS)
def test_an_engine_gives_the_torch_paths_probabilities_and_masks(engine, arch, classes, size, width, tmp_path):
    ref, clf = classifier(arch, classes, size, width), classifier(arch, classes, size, width)
    attach_engine(clf, engine, weights_digest(clf.model.state_dict()), tmp_path)
    images = torch.randint(0, 256, (3, 3, *size), dtype=torch.uint8)
    ok = torch.tensor([True, False, True])
    for tta in (False, True):
        with ref.fixed_weights(), clf.fixed_weights():
            want = batch_probabilities(ref, {"image": images, "ok": ok}, tta)
            got = batch_probabilities(clf, {"image": images, "ok": ok}, tta)
        assert clf.engine.compiled(tta) is not None and got.shape == want.shape
        assert float((got - want).abs().mean()) < 1e-3
        agree = (got.argmax(1) == want.argmax(1)) if classes > 1 else ((got > 0.5) == (want > 0.5))
        assert float(agree.float().mean()) > 0.999
        assert float(got[1].abs().max()) == 0.0  # an unreadable image: all zero, as on the torch path


def trained_statistics(model):
    """Non-trivial BatchNorm parameters and running statistics, as a trained net has (a fresh
    net's are 1 and 0, which folds trivially)."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand(m.weight.shape, generator=gen) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=gen) * 0.2
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model


@pytest.mark.parametrize("arch, classes, size, width", NETWORKS)
def test_both_graph_layouts_compute_the_torch_paths_values_and_the_new_one_has_no_copies(arch, classes, size, width,
                                                                                         tmp_path):
    import numpy as np
    import onnx
    import openvino as ov

    from carvana.training.prediction_graph import ProbabilityGraph, export_graph

    clf = classifier(arch, classes, size, width)
    trained_statistics(clf.model.eval())
    margin = engines.arch_spec(arch).output_margin
    hw = tuple(clf.model_config.input_size[i] - 2 * margin for i in (0, 1))  # as compile_engine exports it
    images = torch.randint(0, 256, (2, 3, *hw), dtype=torch.uint8)
    with clf.fixed_weights():
        want = batch_probabilities(clf, {"image": images, "ok": torch.ones(2, dtype=torch.bool)}, True)
    for layout in (1, 2):
        path = tmp_path / f"graph{layout}.onnx"
        export_graph(ProbabilityGraph(clf.model, clf.model_config, True, layout=layout).eval(), hw, path)
        got = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(images.numpy())[0]
        assert float(np.abs(got - want.numpy().reshape(got.shape)).max()) < 1e-4, layout
        nodes = onnx.load(str(path)).graph.node
        channel_concats = [n for n in nodes if n.op_type == "Concat" and any(a.name == "axis" and a.i == 1
                                                                             for a in n.attribute)]
        gathers = [n for n in nodes if n.op_type == "Gather" and any(a.name == "axis" and a.i == 3 for a in n.attribute)]
        if layout == 2:
            assert gathers and (not channel_concats or arch != "unet1024")  # mirrored by Gather; no skip copies
        else:
            assert not gathers and (len(channel_concats) == 6 or arch != "unet1024")


def test_the_compiled_model_is_cached_keyed_and_rebuilt_when_corrupt(tmp_path, capsys):
    clf = classifier("unet1024", 1, (64, 128), 0.125)
    digest = weights_digest(clf.model.state_dict())
    attach_engine(clf, "openvino", digest, tmp_path)
    first = clf.engine.compiled(True)
    folders = list(tmp_path.iterdir())
    assert len(folders) == 1 and (folders[0] / "model.onnx").is_file() and (folders[0] / "key.json").is_file()
    assert "compiled in" in capsys.readouterr().out
    onnx_bytes = (folders[0] / "model.onnx").read_bytes()
    attach_engine(clf, "openvino", digest, tmp_path)  # the same key: the same folder, the graph not exported again
    assert clf.engine.compiled(True).folder == first.folder and (first.folder / "model.onnx").read_bytes() == onnx_bytes
    attach_engine(clf, "openvino", digest, tmp_path)
    clf.engine.compiled(False)  # another TTA setting: another key
    # Corrupt: rebuilt, not trusted. Replaced by a rename, as any writer of the cache does: the
    # engines map the file, and truncating a mapped file in place would crash the live ones (SIGBUS).
    (first.folder / "junk").write_bytes(b"not a model")
    os.replace(first.folder / "junk", first.folder / "model.onnx")
    attach_engine(clf, "openvino", digest, tmp_path)
    images = torch.randint(0, 256, (2, 3, 64, 128), dtype=torch.uint8)
    with clf.fixed_weights():
        probs = batch_probabilities(clf, {"image": images}, True)
    assert probs.shape == (2, 64, 128) and (first.folder / "model.onnx").read_bytes() != b"not a model"
    assert len(list(tmp_path.iterdir())) == 2
    other = {**clf.model.state_dict()}
    other[next(iter(other))] = other[next(iter(other))] + 1
    assert engines.cache_key(weights_digest(other), clf.model_config, True, "openvino", "auto") != first.folder.name


def test_a_failed_compile_falls_back_to_torch_under_auto_and_is_one_error_when_asked_for(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("compile_model crashed\non this CPU")

    monkeypatch.setattr(engines, "compile_engine", broken)
    images = torch.randint(0, 256, (2, 3, 64, 128), dtype=torch.uint8)
    auto = classifier("unet1024", 1, (64, 128), 0.125)
    attach_engine(auto, "auto", "d", tmp_path)
    with auto.fixed_weights():
        probs = batch_probabilities(auto, {"image": images}, False)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("engine:")]
    assert probs.shape == (2, 64, 128) and len(lines) == 1 and "predicting with torch" in lines[0], lines
    asked = classifier("unet1024", 1, (64, 128), 0.125)
    attach_engine(asked, "openvino", "d", tmp_path)
    with pytest.raises(EngineError, match=r"--engine openvino: cannot compile .*RuntimeError: compile_model crashed on"):
        with asked.fixed_weights():
            batch_probabilities(asked, {"image": images}, False)


def test_which_engine_runs_where():
    assert choose_engine("auto", torch.device("cuda")) == "torch"
    assert choose_engine("auto", torch.device("cpu")) == "openvino"  # installed by requirements.txt
    assert choose_engine("onnxruntime", torch.device("cpu")) == "onnxruntime"
    for name, device, words in (("openvino", "cuda", "CPU only"), ("tensorrt", "cpu", "expected one of")):
        with pytest.raises(EngineError, match=words):
            choose_engine(name, torch.device(device))


def test_main_predicts_with_an_engine_and_its_fingerprint_says_which(tmp_path):
    # Everything in the subprocess (it writes its own demo data): in a long-lived test process that has
    # run engines in-process, heavy drawing afterwards crashed once (SIGSEGV, not reproduced alone).
    args = [sys.executable, str(MAIN), "--input-size", "64x64", "--width", "0.125", "--sample-size", "0.5",
            "--epochs", "1", "--workers", "0", "--engine", "onnxruntime", "--run-name", "e"]
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "engine: onnxruntime (f32)" in result.stdout and "submit.csv.gz: OK" in result.stdout
    record = json.loads((tmp_path / "output" / "submit.csv.gz.json").read_text())
    assert record["components"]["engine"] == "onnxruntime:auto"
    with gzip.open(tmp_path / "output" / "submit.csv.gz", "rt") as f:
        assert f.readline().strip() == "img,rle_mask" and len(f.read().splitlines()) == 64
    bad = subprocess.run([*args[:-4], "--engine", "tensorrt"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 1 and len(lines) == 1 and "--engine 'tensorrt': expected one of" in lines[0]


@pytest.mark.parametrize("arch, size", [("unet1024", (64, 128)), ("unet-original", (36, 36))])
def test_segment_runs_the_same_graph_on_inputs_that_hold_their_margin(arch, size, tmp_path, monkeypatch):
    from carvana.segmenter import Segmenter

    monkeypatch.setattr(engines, "CACHE_DIR", tmp_path)
    torch.manual_seed(0)
    config = make_config(arch, 0.125, 1, size)
    model = build_model(config, pretrained=False)
    photos = torch.randint(0, 256, (2, *config.input_size, 3), dtype=torch.uint8).numpy()  # margin included
    want = Segmenter(model, config, "cpu", tta=True, amp=False, engine="torch").probabilities(photos)
    seg = Segmenter(model, config, "cpu", tta=True, amp=False, engine="openvino")
    got = seg.probabilities(photos)
    assert seg.engine.compiled(True) is not None and got.shape == want.shape == (2, *size)
    assert abs(got - want).mean() < 1e-3 and ((got > 0.5) == (want > 0.5)).mean() > 0.999


# --- --int8 (training/quantize.py): NNCF's int8 graph on OpenVINO -------------------------------------------


def drawn_cars(n, size, seed):
    """uint8 (n, 3, H, W) photos of an ellipse 'car' on a noisy background, and its (n, H, W) masks."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size[0]), torch.linspace(-1, 1, size[1]), indexing="ij")
    centre, radius = torch.rand(n, 2, generator=g) * 0.6 - 0.3, torch.rand(n, 2, generator=g) * 0.3 + 0.3
    masks = (((xx - centre[:, :1, None]) / radius[:, :1, None]) ** 2
             + ((yy - centre[:, 1:, None]) / radius[:, 1:, None]) ** 2) < 1
    car, ground = torch.tensor([200.0, 60, 120]), torch.tensor([70.0, 130, 60])
    photos = torch.where(masks[:, None], car[None, :, None, None], ground[None, :, None, None])
    photos = photos + 25 * torch.randn(n, 3, *size, generator=g)
    return photos.clamp(0, 255).to(torch.uint8), masks


def trained_classifier(size=(64, 64), steps=60):
    """A tiny UNet1024 trained briefly on drawn cars: confident maps, as int8 meets them in use."""
    clf = classifier("unet1024", 1, size, 0.125)
    config, model = clf.model_config, clf.model
    photos, masks = drawn_cars(64, size, seed=1)
    mean, std = torch.tensor(config.mean).view(1, 3, 1, 1), torch.tensor(config.std).view(1, 3, 1, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        i = torch.arange(8) + 8 * (step % 8)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model((photos[i].float() - mean) / std)[:, 0], masks[i].float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return clf


def write_photos(folder, photos):
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, photo in enumerate(photos):
        paths.append(folder / f"train{i:03d}_01.jpg")
        cv2.imwrite(str(paths[-1]), photo.permute(1, 2, 0).numpy()[..., ::-1].copy(), [cv2.IMWRITE_JPEG_QUALITY, 95])
    return paths


def test_int8_gives_probabilities_close_to_float_and_calibrates_on_the_images_given_only(tmp_path, monkeypatch):
    import carvana.data.datasets as datasets
    from carvana.training.quantize import Int8Spec

    read = []

    class Spy(datasets.TestImageDataset):
        def __getitem__(self, i):
            read.append(self.images[i])
            return super().__getitem__(i)

    monkeypatch.setattr(datasets, "TestImageDataset", Spy)
    clf = trained_classifier()
    calibration = write_photos(tmp_path / "train", drawn_cars(16, (64, 64), seed=2)[0])
    digest = weights_digest(clf.model.state_dict())
    attach_engine(clf, "openvino", digest, tmp_path / "engines")
    float_slot = clf.engine
    spec = Int8Spec(tuple(calibration))
    attach_engine(clf, "openvino", digest, tmp_path / "engines", int8=spec)
    photos, masks = drawn_cars(8, (64, 64), seed=3)  # unseen images
    with clf.fixed_weights():
        got = batch_probabilities(clf, {"image": photos}, True)
        clf.engine, int8_slot = float_slot, clf.engine
        want = batch_probabilities(clf, {"image": photos}, True)
    compiled = int8_slot.compiled(True)
    assert compiled.precision.startswith("int8") and (compiled.folder / "int8.xml").is_file()
    assert compiled.folder != float_slot.compiled(True).folder  # int8 has a cache key of its own
    assert sorted(set(read)) == sorted(calibration)  # calibration read these images and nothing else
    assert float((want > 0.5).eq(masks).float().mean()) > 0.97  # the float model is trained-ish
    assert float((got - want).abs().mean()) < 0.02, float((got - want).abs().mean())
    assert float((got > 0.5).eq(want > 0.5).float().mean()) > 0.99


def test_the_int8_graph_is_cached_under_its_scope_and_calibration_images(tmp_path):
    from carvana.training.quantize import Int8Spec

    clf = classifier("unet1024", 1, (64, 64), 0.125)
    digest = weights_digest(clf.model.state_dict())
    photos = write_photos(tmp_path / "train", drawn_cars(6, (64, 64), seed=4)[0])
    folders = []
    for spec in (Int8Spec(tuple(photos[:4])), Int8Spec(tuple(photos[:4])), Int8Spec(tuple(photos[2:])),
                 Int8Spec(tuple(photos[:4]), "full-resolution")):
        attach_engine(clf, "openvino", digest, tmp_path / "engines", int8=spec)
        folders.append(clf.engine.compiled(False).folder)
        if len(folders) == 1:
            written = (folders[0] / "int8.xml").stat().st_mtime_ns
    assert folders[0] == folders[1] and (folders[0] / "int8.xml").stat().st_mtime_ns == written  # reused, not redone
    assert len(set(folders)) == 3  # other calibration images, another scope: other keys


def test_the_scopes_keep_the_first_last_and_full_resolution_convolutions_in_float(tmp_path):
    import openvino as ov

    from carvana.training.prediction_graph import ProbabilityGraph, export_graph
    from carvana.training.quantize import kept_in_float

    clf = classifier("unet1024", 1, (64, 64), 0.125)
    export_graph(ProbabilityGraph(clf.model, clf.model_config, True).eval(), (64, 64), tmp_path / "m.onnx")
    model = ov.Core().read_model(str(tmp_path / "m.onnx"))
    convs = [op for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
    ends, full = kept_in_float(model, "ends"), kept_in_float(model, "full-resolution")
    assert ends == sorted({convs[0].get_friendly_name(), convs[-1].get_friendly_name()})
    assert convs[-1].get_output_partial_shape(0)[1].get_length() == 1  # the 1x1 head
    top = {op.get_friendly_name() for op in convs if op.get_output_partial_shape(0)[2].get_length() == 64}
    assert set(full) == top | set(ends) and len(full) > len(ends)
