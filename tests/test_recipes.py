"""The recipes in configs/: each parses with main.py's own settings reader and runs end to end.

Every ``configs/*.toml`` must (1) be read by ``parse_command`` against main.py's settings, so an
unknown key or a value of the wrong type fails here, and (2) run ``python main.py --config
configs/X.toml`` to its output in a fresh working folder, with tiny overrides on the command line
(1 epoch, 64x64-ish inputs, width 0.125, no workers, ``--encoder-weights none``: nothing is
downloaded) on tiny data made here. The recipe's own keys (threshold auto, crop, arch,
encoder, dataset, classes, time budget, sync BatchNorm, ...) stay as the file says wherever a
tiny value is not needed, so the code path each recipe takes keeps working.

A new recipe file must be added to RECIPES below (test_every_recipe_file_is_run says so).
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carvana.data.demo.dataset import write_demo_dataset
from carvana.pipeline.settings import flag_of, parse_command
from carvana.submission.validate import expected_names, validate_submission
import main_helpers
from main_helpers import main_defaults

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "main.py"
CONFIGS = ROOT / "configs"

COMMON = ["--epochs", "1", "--batch-size", "2", "--workers", "0", "--predict-batch-size", "2",
          "--encoder-weights", "none", "--run-name", "t"]
UNET1024 = ["--input-size", "64x64", "--width", "0.125"]
SMP = ["--input-size", "64x64"]

# recipe file -> (data it runs on, tiny overrides beyond COMMON)
RECIPES: dict[str, tuple[str, list[str]]] = {
    "demo.toml": ("carvana", UNET1024),
    # 2 folds on the 2 train cars (4 folds need 4 cars and take 4x the folds' training, OOF
    # scoring and ensemble prediction); --threshold auto and the fold/OOF/ensemble path stay.
    "carvana-cpu-folds.toml": ("carvana", [*UNET1024, "--folds", "2"]),
    # 2 folds, fold 0 of them: the recipe's one-fold training, OOF threshold and fold-0 prediction;
    # its coarse size scaled down with the input (the coarse path itself: tests/test_coarse.py).
    "carvana-cpu-45min.toml": ("carvana", [*UNET1024, "--folds", "2", "--coarse-size", "64x64"]),
    # the same + the warm refit on every car with the fold's pseudo-labels of the test images
    "carvana-cpu-45min-pseudo.toml": ("carvana", [*UNET1024, "--folds", "2"]),
    "kaggle-gpu-unet1024.toml": ("carvana", UNET1024),
    "kaggle-notebook-t4.toml": ("carvana", UNET1024),  # sync_batchnorm: ignored on the CPU, with a note
    # Native 1280x1920 cannot be shrunk: a small input size and a smaller crop (UNet1024: multiples
    # of 64) keep the --crop path.
    "native-crops.toml": ("carvana", ["--input-size", "64x128", "--crop", "64x64", "--width", "0.125"]),
    "unet-original.toml": ("carvana", ["--input-size", "20x20", "--width", "0.125"]),  # output 20 = 4 + 16
    "linknet34.toml": ("carvana", SMP),
    "vgg11-unet.toml": ("carvana", SMP),
    "oxford-pet-mobilenetv2.toml": ("oxford-pet", SMP),
    "carla.toml": ("carla", SMP),
}
XFAIL: dict[str, str] = {}  # recipe file -> why it fails (a program bug, see the report)


def recipe_files() -> list[Path]:
    return sorted(CONFIGS.glob("*.toml"))


def test_every_recipe_file_is_run():
    """A recipe added to configs/ without a case here would rot unseen."""
    assert [p.name for p in recipe_files()] == sorted(RECIPES)


@pytest.mark.parametrize("path", recipe_files(), ids=lambda p: p.name)
def test_recipe_parses_with_mains_settings(path):
    """Unknown keys and wrong types are errors of the reader; each key is recorded as given by the file."""
    command = parse_command(main_defaults(), ["--config", str(path)])
    text = path.read_text()
    assert command.recipe == {"file": str(path), "contents": text}
    assert set(command.given.values()) <= {str(path)}
    # A comment header saying how to run it.
    assert text.startswith("#") and f"--config configs/{path.name}" in text


def test_flags_override_a_recipe():
    command = parse_command(main_defaults(), ["--config", str(CONFIGS / "carvana-cpu-folds.toml"), "--folds", "2"])
    assert command.hp.folds == 2 and command.given["folds"] == "command line"
    assert command.hp.threshold == "auto" and command.given["threshold"].endswith("carvana-cpu-folds.toml")


# --- tiny data ------------------------------------------------------------------------------


def write_oxford_pet(root: Path) -> Path:
    """images/<Breed>_<n>.jpg + annotations/trimaps/<same>.png (1 pet, 2 background, 3 border)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "annotations" / "trimaps").mkdir(parents=True)
    for breed in ("Abyssinian", "beagle"):
        for i in range(1, 4):
            trimap = np.full((40, 48), 2, np.uint8)
            y, x = rng.integers(4, 16, 2)
            trimap[y:y + 20, x:x + 24] = 1
            trimap[y, x:x + 24] = 3
            image = np.where((trimap == 1)[..., None], [200, 120, 60], [40, 60, 90]).astype(np.uint8)
            Image.fromarray(image).save(root / "images" / f"{breed}_{i}.jpg", quality=95)
            Image.fromarray(trimap, mode="L").save(root / "annotations" / "trimaps" / f"{breed}_{i}.png")
    return root


def write_carla(root: Path) -> Path:
    """CameraRGB/*.png + CameraSeg/*.png, the class id (of 13) in the mask's red channel."""
    rng = np.random.default_rng(1)
    (root / "CameraRGB").mkdir(parents=True)
    (root / "CameraSeg").mkdir(parents=True)
    for name in ("02_00_000", "02_00_001", "02_00_010", "02_00_011", "02_00_020", "02_00_021"):
        seg = np.zeros((36, 48, 3), np.uint8)
        seg[18:, :, 0] = 7  # roads
        seg[:18, :, 0] = 1  # buildings
        y, x = rng.integers(10, 24, 2)
        seg[y:y + 8, x:x + 12, 0] = 10  # a vehicle
        image = (seg[..., :1] * 20 + rng.integers(0, 30, (36, 48, 3))).astype(np.uint8)
        Image.fromarray(image).save(root / "CameraRGB" / f"{name}.png")
        Image.fromarray(seg, mode="RGB").save(root / "CameraSeg" / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """One tiny data set of each kind, shared by every recipe run (none of them writes into it)."""
    root = tmp_path_factory.mktemp("recipe-data")
    return {
        "carvana": write_demo_dataset(root / "tiny", seed=3, n_train_cars=2, n_test_cars=1),
        "oxford-pet": write_oxford_pet(root / "pets"),
        "carla": write_carla(root / "carla"),
    }


def clean_env(home: Path) -> dict[str, str]:
    """No Kaggle credentials, no mounted competition files, no downloads; one torch thread.

    One thread: these runs check that a recipe works, not its speed, and on a shared 2-core box
    two OpenMP threads fighting other jobs made a tiny run 2-3x slower (31 s against 10-16 s).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAGGLE_", "CARVANA_"))}
    env.update(HOME=str(home), CARVANA_INPUT="", CARVANA_WORKING="", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def recipe_cases() -> list:
    return [pytest.param(name, id=name,
                         marks=[pytest.mark.xfail(strict=True, reason=XFAIL[name])] if name in XFAIL else [])
            for name in sorted(RECIPES)]


@pytest.mark.parametrize("name", recipe_cases())
def test_recipe_runs_end_to_end(name, datasets, tmp_path):
    kind, tiny = RECIPES[name]
    cwd = tmp_path / "run"
    cwd.mkdir()
    command = [sys.executable, str(MAIN), "--config", str(CONFIGS / name), *COMMON, *tiny,
               "--data-dir", str(datasets[kind])]
    result = main_helpers.run_main(cwd, *command[2:], env=clean_env(tmp_path))
    said = f"$ {' '.join(command[1:])}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert result.returncode == 0, said
    assert "Traceback" not in result.stderr, said
    # The run used the recipe: every key not overridden here is recorded with the file's value.
    hparams = json.loads((cwd / "logs" / "t" / "hparams.json").read_text())
    recipe = tomllib.loads((CONFIGS / name).read_text())
    assert {k: hparams[k] for k in recipe if flag_of(k) not in command} == \
        {k: v for k, v in recipe.items() if flag_of(k) not in command}
    if kind == "carvana":
        report = validate_submission(cwd / "output" / "submit.csv.gz", expected_names(datasets[kind] / "sample_submission.csv"))
        assert report.ok, f"{report}\n{said}"
        if "--folds" in tiny:  # threshold auto: one of the grid's 0.30..0.70, chosen on the out-of-fold Dice
            summary = json.loads((cwd / "logs" / "t" / "summary.json").read_text())
            assert 0.3 <= float(summary["threshold"]) <= 0.7 and "mean_oof_dice" in summary, said
    else:
        images = {p.stem for p in datasets[kind].rglob("*") if p.parent.name in ("images", "CameraRGB")}
        masks = {p.stem for p in (cwd / "output" / "t" / "masks").glob("*.png")}
        assert masks & images and masks - {"legend"} <= images, said
