"""CPU evaluation streams: several batches at once, results in order, the same numbers."""

import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from carvana.models.registry import ModelConfig, build_model
from carvana.submission.ensemble import EnsemblePredictor, Member, size_key
from carvana.training.callbacks import Callback
from carvana.training.classifier import CarvanaClassifier
from carvana.training.evaluation import batch_probabilities
from carvana.training.streams import MAX_AUTO_STREAMS, choose_eval_streams, ordered_map, threads_per_stream

REPO = Path(__file__).resolve().parents[1]


def test_results_come_in_input_order_whatever_finishes_first():
    rng = random.Random(0)
    delays = [rng.uniform(0, 0.01) for _ in range(40)]

    def slow_square(i):
        time.sleep(delays[i])
        return i * i, threading.current_thread().name

    out = list(ordered_map(slow_square, range(40), streams=3))
    assert [item for item, _ in out] == list(range(40))
    assert [r[0] for _, r in out] == [i * i for i in range(40)]
    assert len({r[1] for _, r in out}) > 1  # really ran on several threads


def test_one_stream_runs_on_the_calling_thread():
    me = threading.current_thread().name
    assert [r for _, r in ordered_map(lambda i: threading.current_thread().name, range(3), 1)] == [me] * 3


def test_at_most_two_batches_per_stream_are_taken_ahead():
    taken, yielded, ahead = [0], [0], []

    def items():
        for i in range(30):
            taken[0] += 1
            ahead.append(taken[0] - yielded[0])
            yield i

    for _ in ordered_map(lambda i: i, items(), streams=2):
        yielded[0] += 1
    assert max(ahead) <= 2 * 2 + 1 and yielded[0] == 30


def test_an_error_in_a_batch_is_raised_in_order_and_stops_the_map():
    def fn(i):
        if i == 5:
            raise ValueError("bad batch 5")
        return i

    seen = []
    with pytest.raises(ValueError, match="bad batch 5"):
        for item, _ in ordered_map(fn, range(20), streams=2):
            seen.append(item)
    assert seen == [0, 1, 2, 3, 4]


def test_streams_share_the_threads_and_give_them_back():
    before = torch.get_num_threads()
    with threads_per_stream(before + 1) as each:
        assert each == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_automatic_streams_are_one_per_cpu_thread_up_to_a_cap():
    cpu = torch.device("cpu")
    assert choose_eval_streams(cpu) == max(1, min(torch.get_num_threads(), MAX_AUTO_STREAMS))
    assert choose_eval_streams(cpu, 3) == 3
    assert choose_eval_streams(torch.device("cuda"), 0) == 1  # a device object: no GPU needed
    with pytest.raises(ValueError, match="only CPU evaluation"):
        choose_eval_streams(torch.device("cuda"), 2)
    with pytest.raises(ValueError, match=">= 0"):
        choose_eval_streams(cpu, -1)


class Images(Dataset):
    def __init__(self, n, hw=(64, 64)):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 255, (n, 3, *hw), generator=g, dtype=torch.uint8)
        self.masks = (torch.rand(n, 1, *hw, generator=g) > 0.5).float()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        full = np.zeros((1280, 1918), dtype=np.uint8)
        full[300:900, 400:1500] = 1
        return {"image": self.images[i], "mask": self.masks[i], "full_mask": full, "name": f"img{i:02d}.jpg",
                "ok": i != 3}


class Keep(Callback):
    def __init__(self):
        self.names, self.probs = [], []

    def on_predict_batch_end(self, trainer, names, probs):
        self.names += names
        self.probs.append(probs.clone())


def classifier(streams: int) -> CarvanaClassifier:
    torch.manual_seed(0)
    config = ModelConfig(arch="unet1024", width=0.125, input_size=(64, 64))
    return CarvanaClassifier(build_model(config), epochs=1, device="cpu", progress=False, preview_count=2,
                             model_config=config, eval_streams=streams)


def alone(clf: CarvanaClassifier, data: Images, tta: bool) -> dict[str, torch.Tensor]:
    """Each image's probabilities computed on its own, on this thread: no loader batch, no stream."""
    with clf.fixed_weights():
        return {item["name"]: batch_probabilities(clf, {"image": item["image"][None], "ok": torch.tensor([item["ok"]])},
                                                  tta)[0] for item in (data[i] for i in range(len(data)))}


def assert_each_name_has_its_own_map(keep: Keep, reference: dict[str, torch.Tensor]) -> None:
    """Every map a callback got is the one of the image named beside it (rounding at most). The
    images' own maps differ by far more than that, so names paired with another batch's maps fail."""
    maps = torch.cat(keep.probs)
    assert keep.names == list(reference) and len(maps) == len(keep.names)
    for name, prob in zip(keep.names, maps):
        torch.testing.assert_close(prob, reference[name], atol=2e-2, rtol=0, msg=f"{name}: another image's map")


def test_prediction_and_validation_give_the_same_numbers_with_several_streams():
    data = Images(10)
    loader = DataLoader(data, batch_size=2)
    reference = alone(classifier(1), data, tta=True)
    others = [(a, b) for a in reference for b in reference if a < b]
    assert min(float((reference[a] - reference[b]).abs().max()) for a, b in others) > 0.2  # tells images apart
    runs = {}
    for streams in (1, 3):
        clf = classifier(streams)
        assert clf.streams == streams
        keep = Keep()
        clf.predict(loader, [keep], tta=True)
        assert_each_name_has_its_own_map(keep, reference)
        runs[streams] = (keep, clf.validate(loader))
    (keep1, (loss1, dice1, prev1)), (keep3, (loss3, dice3, prev3)) = runs[1], runs[3]
    assert keep3.names == keep1.names == [f"img{i:02d}.jpg" for i in range(10)]
    for a, b in zip(keep1.probs, keep3.probs):  # one thread or several per op: rounding at most
        torch.testing.assert_close(a, b, atol=2e-2, rtol=0)
    assert float(keep3.probs[1][1].abs().max()) == 0.0  # unreadable image 3: an empty map
    assert loss3 == pytest.approx(loss1, abs=1e-3) and dice3 == pytest.approx(dice1, abs=1e-3)
    assert prev3.probs.shape == prev1.probs.shape


def test_an_ensemble_predicts_in_order_on_several_streams():
    members = [Member(Path(f"m{i}.pt"), classifier(2), classifier(2).model_config, 0.5, f"d{i}") for i in range(2)]
    predictor = EnsemblePredictor(members, progress=False)
    assert predictor.streams == 2
    loader = DataLoader([{**item, size_key((64, 64)): item["image"]} for item in Images(6)], batch_size=2)
    keep = Keep()
    predictor.predict(loader, [keep], tta=False)
    assert keep.names == [f"img{i:02d}.jpg" for i in range(6)]
    # Two identical members: their average is either one's map, image by image.
    assert_each_name_has_its_own_map(keep, alone(members[0].classifier, Images(6), tta=False))


def test_a_negative_stream_count_is_refused_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "main.py"), "--eval-streams", "-1", "--epochs", "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].endswith("--eval-streams must be >= 0 (0 = automatic), got -1")
    assert "Traceback" not in proc.stderr
