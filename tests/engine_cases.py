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
