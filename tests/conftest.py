"""Shared fixtures: tiny synthetic batches, and where the real data slice lives."""

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

SHARED = Path(__file__).resolve().parents[2] / "shared"
CARVANA_SAMPLE = SHARED / "carvana-sample"


def synthetic_batches(n_batches: int, batch_size: int = 2, hw=(64, 64), seed: int = 0, full_masks: bool = True):
    """Batches like TrainImageDataset's: an ellipse 'car' whose colour differs from the background."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, hw[0]), torch.linspace(-1, 1, hw[1]), indexing="ij")
    for b in range(n_batches):
        centre = torch.rand(batch_size, 2, generator=g) * 0.6 - 0.3
        radius = torch.rand(batch_size, 2, generator=g) * 0.3 + 0.3
        masks = ((((xx - centre[:, 0, None, None]) / radius[:, 0, None, None]) ** 2
                  + ((yy - centre[:, 1, None, None]) / radius[:, 1, None, None]) ** 2) < 1).float()[:, None]
        images = masks * torch.tensor([1.0, -0.5, 0.2])[None, :, None, None] + 0.3 * torch.randn(
            batch_size, 3, *hw, generator=g)
        batch = {"image": images, "mask": masks, "name": [f"car{b}_{i:02d}.jpg" for i in range(batch_size)]}
        if full_masks:
            batch["full_mask"] = (F.interpolate(masks, size=(1280, 1918), mode="nearest")[:, 0] > 0.5).to(torch.uint8)
        batches.append(batch)
    return batches


@pytest.fixture
def carvana_sample() -> Path:
    if not (CARVANA_SAMPLE / "train_masks.csv").exists():
        pytest.skip(f"real data slice not present at {CARVANA_SAMPLE}")
    return CARVANA_SAMPLE


@pytest.fixture
def kaggle_home(monkeypatch, tmp_path) -> Path:
    """An empty HOME (with an empty ~/.kaggle) and no KAGGLE_* variables, so a developer's
    real Kaggle credentials are never seen by a test."""
    for name in list(os.environ):
        if name.startswith("KAGGLE_"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    home = tmp_path / "home"
    (home / ".kaggle").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture(autouse=True, scope="module")
def _collect_garbage_after_each_module():
    """Free what a test module left (compiled inference engines with their thread pools, loaders)
    on the main thread, when the module ends, rather than whenever a collection happens to run
    in whichever thread of a long-lived test worker."""
    yield
    import gc

    gc.collect()
