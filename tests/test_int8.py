"""--int8 (training/quantize.py): refusals, the images each member is calibrated and gated on,
the gate's verdict, and main.py end to end (the gate before any test prediction).

Nothing here compiles OpenVINO in this process (those cases are in tests/engine_cases.py, run
in a process of their own); main.py runs in subprocesses.
"""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from carvana.training import engines, quantize
from carvana.training.engines import EngineError
from carvana.training.quantize import (GATE_IMAGES, Int8Error, Int8Plan, Int8Spec, MemberImages, check_int8,
                                       member_images, plan_int8)
import main_helpers

MAIN = Path(__file__).resolve().parents[1] / "main.py"
SETTINGS = SimpleNamespace(engine="auto", int8_max_drop=0.0005, tta=True, predict_batch_size=2, workers=0,
                           fast_decode=True)


def names(prefix: str, cars: int, angles: int = 4) -> list[Path]:
    return [Path(f"/data/{prefix}/{prefix}{c:02d}_{a:02d}.jpg") for c in range(cars) for a in range(1, angles + 1)]


def masks_of(images: list[Path]) -> list[Path]:
    return [p.with_name(p.stem + "_mask.gif") for p in images]


@pytest.mark.parametrize("engine, device, words", [
    ("torch", "cpu", "--engine torch cannot run it"),
    ("onnxruntime", "cpu", "--engine onnxruntime cannot run it"),
    ("auto", "cuda", "this run predicts on cuda"),
    ("openvino", "cuda:0", "this run predicts on cuda:0"),
])
def test_int8_is_refused_in_one_line_where_it_cannot_run(engine, device, words):
    with pytest.raises(Int8Error, match=words) as caught:
        check_int8(engine, device)
    assert "\n" not in str(caught.value) and str(caught.value).startswith("--int8: ")
    assert isinstance(caught.value, EngineError)  # main.py's USER_ERRORS: one line, exit 1


def test_int8_is_refused_without_openvino_or_nncf(monkeypatch):
    check_int8("auto", "cpu")  # both installed by requirements.txt
    monkeypatch.setattr(quantize, "nncf_version", lambda: "")
    with pytest.raises(Int8Error, match="needs OpenVINO and NNCF"):
        check_int8("auto", "cpu")
    monkeypatch.undo()
    monkeypatch.setattr(engines, "engine_version", lambda name: "" if name == "openvino" else "1")
    with pytest.raises(Int8Error, match="needs OpenVINO and NNCF"):
        check_int8("auto", "cpu")  # auto would mean torch here


def test_calibration_takes_training_images_only_and_the_gate_the_held_out_ones():
    train, valid, test = names("train", 10), names("valid", 3), names("test", 5)
    data = SimpleNamespace(train_images=train, train_masks=masks_of(train), valid_images=valid,
                           valid_masks=masks_of(valid), test_images=test, mask_rles=None)
    plan = plan_int8(SETTINGS, "cpu", data, [Path("/runs/x/best.pt"), Path("/other/fold1/best.pt")])
    for images, spec in zip(plan.images, plan.specs):
        assert images.held and images.held_out == valid and images.masks == masks_of(valid)
        assert list(spec.calibration) == images.calibration == train  # 40 <= CALIBRATION_IMAGES: all of them
        assert not set(spec.calibration) & (set(test) | set(valid))


def test_a_fold_model_is_gated_on_its_own_held_out_cars():
    images = names("train", 6)
    table = pd.DataFrame({"image": [p.name for p in images], "car": [p.name[:7] for p in images],
                          "angle": [int(p.stem[-2:]) for p in images], "fold": [int(p.name[5:7]) % 3 for p in images]})
    for f in range(3):
        got = member_images(Path(f"/m/run/fold{f}/best.pt"), (images, masks_of(images)), ([], []), table,
                            Path("/m/run"))
        held = [p for p in images if int(p.name[5:7]) % 3 == f]
        assert got.held and got.held_out == held and got.masks == masks_of(held)
        assert set(got.calibration) == set(images) - set(held)
    # another run's fold model: this run's folds say nothing about it; nothing held out -> training images, said so
    other = member_images(Path("/elsewhere/fold0/best.pt"), (images, masks_of(images)), ([], []), table, Path("/m/run"))
    assert not other.held and 1 <= len(other.held_out) <= GATE_IMAGES
    assert not set(other.held_out) & set(other.calibration) and set(other.held_out) <= set(images)


def fake_member():
    return SimpleNamespace(classifier=SimpleNamespace(engine=None), config=None)


@pytest.mark.parametrize("held", [True, False])
def test_the_gate_refuses_a_drop_above_the_limit_in_one_line_and_passes_within(monkeypatch, capsys, held):
    monkeypatch.setattr(quantize, "gate_scores", lambda *a, **k: (0.99012, 0.98889))
    images = MemberImages([Path("t.jpg")], [Path(f"v{i}.jpg") for i in range(96)], [Path("m.gif")] * 96, held)
    with pytest.raises(Int8Error) as caught:
        Int8Plan([images], 0.0005, SETTINGS).gate([fake_member()], 0.5)
    where = "96 held-out images" if held else "96 training images (nothing held out)"
    assert str(caught.value) == (f"--int8: validation Dice fell by 0.00123 (0.99012 -> 0.98889) on {where}, more than "
                                 "--int8-max-drop 0.0005; predict without --int8 or raise the limit")
    figures = Int8Plan([images], 0.002, SETTINGS).gate([fake_member()], 0.5)
    assert figures == [{"float_dice": 0.99012, "int8_dice": 0.98889, "images": 96, "held_out": held, "scope": "ends"}]
    assert capsys.readouterr().out.count("within --int8-max-drop 0.002") == 1


def test_the_gate_compares_the_same_engine_in_float_then_restores_int8(monkeypatch):
    seen = []

    def score(clf, *args, **kwargs):
        seen.append(clf.engine.int8)
        return pd.DataFrame({"image": ["a.jpg"], "dice@0.5": [0.9 if clf.engine.int8 is None else 0.8]})

    monkeypatch.setattr("carvana.training.oof.score_fold", score)
    spec = Int8Spec((Path("cal.jpg"),))
    slot = engines.EngineSlot("openvino", "auto", torch.nn.Identity(), None, "d", True, 2, int8=spec)
    member = SimpleNamespace(classifier=SimpleNamespace(engine=slot), config=SimpleNamespace(arch="unet1024"))
    monkeypatch.setattr("carvana.models.registry.output_size", lambda config: (64, 64))
    fp, q = quantize.gate_scores(member, MemberImages([], [Path("a.jpg")], [Path("a.gif")]), 0.5, SETTINGS)
    assert (fp, q) == (0.9, 0.8) and seen == [None, spec] and member.classifier.engine is slot


def test_the_int8_identity_names_the_scope_and_the_calibration_images(tmp_path):
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    a.write_bytes(b"x" * 10)
    b.write_bytes(b"y" * 10)
    one, other = Int8Spec((a,)), Int8Spec((b,))
    assert one.identity.startswith("int8-ends-") and one.identity != other.identity
    assert Int8Spec((a,), "full-resolution").identity != one.identity
    before = one.identity
    a.write_bytes(b"x" * 11)  # the same name, other contents
    assert Int8Spec((a,)).identity != before
    slot = engines.EngineSlot("openvino", "auto", torch.nn.Identity(), None, "d", True, 2, int8=one)
    assert slot.identity == f"openvino:auto:{one.identity}"  # the submission fingerprint's engine component
    assert engines.EngineSlot("openvino", "auto", torch.nn.Identity(), None, "d", True, 2).identity == "openvino:auto"


def run_main(cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    return main_helpers.run_main(cwd, "--input-size", "64x64", "--width", "0.125", "--sample-size", "0.5",
                                 "--epochs", "1", "--workers", "0", "--run-name", "q", *extra)


def test_main_gates_int8_on_the_validation_cars_before_predicting(tmp_path):
    # OpenVINO and NNCF run in the subprocesses only (see tests/test_engines.py).
    ok = run_main(tmp_path, "--int8", "--int8-max-drop", "1")
    assert ok.returncode == 0, ok.stderr[-2000:]
    lines = [line for line in ok.stdout.splitlines() if line.startswith("int8: validation Dice")]
    assert len(lines) == 1 and "held-out images, within --int8-max-drop 1" in lines[0], ok.stdout[-3000:]
    assert "engine: openvino (int8" in ok.stdout and "submit.csv.gz: OK" in ok.stdout
    record = json.loads((tmp_path / "output" / "submit.csv.gz.json").read_text())
    assert record["components"]["engine"].startswith("openvino:auto:int8-ends-")
    with gzip.open(tmp_path / "output" / "submit.csv.gz", "rt") as f:
        assert len(f.read().splitlines()) == 65
    summary = json.loads((tmp_path / "logs" / "q" / "summary.json").read_text())
    assert summary["int8_gate"][0]["held_out"] and summary["int8_gate"][0]["images"] > 0

    # An impossible limit: refused in one line, exit 1, nothing predicted.
    refused = run_main(tmp_path, "--no-train", "--int8", "--int8-max-drop", "-1", "--output", "output/refused.csv.gz")
    err = refused.stderr.strip().splitlines()
    assert refused.returncode == 1 and len(err) == 1, refused.stderr[-2000:]
    assert err[0].startswith("error: --int8: validation Dice fell by ") and "more than --int8-max-drop -1;" in err[0]
    assert not (tmp_path / "output" / "refused.csv.gz").exists()

    torch_engine = run_main(tmp_path, "--no-train", "--int8", "--engine", "torch", "--output", "output/t.csv.gz")
    err = torch_engine.stderr.strip().splitlines()
    assert torch_engine.returncode == 1 and len(err) == 1 and "--int8: quantizes the OpenVINO graph" in err[0]
    assert not (tmp_path / "output" / "t.csv.gz").exists()


def test_a_failed_int8_build_is_one_error_even_under_auto(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("nncf.quantize failed\non this graph")

    monkeypatch.setattr(engines, "compile_engine", broken)
    slot = engines.EngineSlot("openvino", "auto", torch.nn.Identity(), None, "d", True, 2, int8=Int8Spec(()))
    with pytest.raises(EngineError, match=r"^--int8: cannot quantize or compile .*RuntimeError: nncf.quantize failed on"):
        slot.compiled(True)  # never a silent fall back to float torch
    with pytest.raises(EngineError, match="--int8: quantizes the OpenVINO graph; --engine torch means torch"):
        engines.attach_engine(SimpleNamespace(device=torch.device("cpu")), "torch", "d", int8=Int8Spec(()))
