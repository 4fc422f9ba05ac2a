"""torchrun / DDP: 2 CPU processes (gloo) on a tiny demo dataset against single-process references.

One module-scoped torchrun run (1 epoch, 64x64, width 0.125) is checked for: a checkpoint that
loads in one process, logs written once, a sharded validation Dice equal to a single-process
validation of the same weights, and a sharded submission equal (rows and bytes) to a
single-process prediction from the same checkpoint. A second run resumes it under torchrun.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from carvana.training.checkpoint import load_checkpoint, save_checkpoint
from carvana.training.classifier import CarvanaClassifier
from carvana.data.datasets import TrainImageDataset
from carvana.data.demo.dataset import write_demo_dataset
from carvana.training.distributed import ShardSampler
from carvana.data.sources.fetcher import DatasetFetcher
from carvana.models.unet1024 import UNet1024
from carvana.submission.fingerprint import marker_path
from carvana.submission.gzip_stream import ChunkedGzipWriter, deflate_chunk
from carvana.submission.sharded import assemble_shards, shard_names

MAIN = Path(__file__).resolve().parents[1] / "main.py"
SEED, VALIDATION_SIZE = 7, 0.5  # passed explicitly: the test must not depend on main.py's defaults
# 16 test images in chunks of 6 -> chunks of 6, 6, 4: rank 0 writes two members, rank 1 one.
COMMON = ["--input-size", "64x64", "--width", "0.125", "--batch-size", "2", "--workers", "0",
          "--seed", str(SEED), "--validation-size", str(VALIDATION_SIZE), "--chunk-size", "6",
          "--predict-batch-size", "3", "--postprocess-workers", "1",
          # fp32: these tests compare sharded with single-process results to float rounding, and
          # bf16 autocast (native-bf16 CPUs) rounds 2^8 times coarser for other batch compositions.
          "--no-amp"]


def run_main(cwd: Path, args: list[str], nproc: int = 1) -> str:
    """Run main.py (under torchrun when nproc > 1) in ``cwd``; returns stdout, fails with its tail."""
    # torchrun defaults every worker to OMP_NUM_THREADS=1; the single-process reference uses
    # the same, because CPU float results may depend on the thread count.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = (launcher if nproc > 1 else [sys.executable]) + [str(MAIN), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def valid_split(data: Path) -> tuple[list[Path], list[Path]]:
    fetcher = DatasetFetcher()
    fetcher.use_folder(data)
    _, _, images, masks = fetcher.get_train_files(VALIDATION_SIZE, 1.0, SEED)
    return images, masks


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> dict:
    """One 2-process torchrun training + prediction run; returns its folders and stdout."""
    root = tmp_path_factory.mktemp("ddp")
    data = write_demo_dataset(root / "data", n_train_cars=2, n_test_cars=1)
    # An odd number of validation images: a padded shard (DistributedSampler) would count one twice.
    images, masks = valid_split(data)
    images[0].unlink()
    masks[0].unlink()
    cwd = root / "run"
    cwd.mkdir()
    stdout = run_main(cwd, [*COMMON, "--epochs", "1", "--data-dir", str(data)], nproc=2)
    (run_dir,) = (cwd / "output" / "models").iterdir()
    return {"root": root, "data": data, "cwd": cwd, "run_dir": run_dir, "stdout": stdout}


def test_torchrun_training_writes_a_checkpoint_that_loads_in_one_process_and_logs_once(ddp_run):
    state = load_checkpoint(ddp_run["run_dir"] / "best.pt")
    assert state["epoch"] == 0 and state["hparams"]["width"] == 0.125
    UNet1024(width=0.125).load_state_dict(state["model"])  # strict: plain keys, no "module." prefix
    assert ddp_run["stdout"].count("epoch 1/1") == 1  # only rank 0 prints
    metrics = (ddp_run["cwd"] / "logs" / ddp_run["run_dir"].name / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 2  # header + one row: only rank 0 writes


def test_sharded_validation_dice_equals_single_process_dice_of_the_same_weights(ddp_run):
    state = load_checkpoint(ddp_run["run_dir"] / "last.pt")
    images, masks = valid_split(ddp_run["data"])
    assert len(images) % 2 == 1
    classifier = CarvanaClassifier(UNet1024(width=0.125), epochs=1, device="cpu", amp=False, progress=False)
    classifier.load_state_dict(state, weights_only=True)
    dataset = TrainImageDataset(images, masks, (64, 64), full_masks=True)
    loss, dice, _ = classifier.validate(DataLoader(dataset, batch_size=2))
    # Not bit-exact: CPU convolutions round differently for other batch compositions (rank 0
    # scores images 0+2, 4+6, ...), which flips the odd pixel at the threshold: ~1e-7 of Dice.
    tol = 5e-6
    assert state["metrics"]["valid_dice"] == pytest.approx(dice, abs=tol)
    assert state["metrics"]["valid_loss"] == pytest.approx(loss, rel=1e-5)
    # The tolerance is far below what a padded shard (image 0 scored twice) would shift.
    first = classifier.validate(DataLoader(dataset, sampler=[0]))[1]
    assert abs(first - dice) / (len(images) + 1) > 10 * tol


def test_sharded_prediction_equals_single_process_prediction_from_the_same_checkpoint(ddp_run):
    single = ddp_run["root"] / "single.csv.gz"
    args = ["--no-train", "--checkpoint", str(ddp_run["run_dir"] / "best.pt"), "--output", str(single)]
    run_main(ddp_run["root"], [*COMMON, *args, "--data-dir", str(ddp_run["data"])])
    sharded = ddp_run["cwd"] / "output" / "submit.csv.gz"
    with gzip.open(single, "rt") as a, gzip.open(sharded, "rt") as b:
        single_rows, sharded_rows = a.read().splitlines(), b.read().splitlines()
    assert len(sharded_rows) == 17 and sharded_rows[0] == "img,rle_mask"
    assert sharded_rows == single_rows
    assert sharded.read_bytes() == single.read_bytes()
    inflater = zlib.decompressobj(wbits=31)  # read only the first member: it holds every row
    assert inflater.decompress(sharded.read_bytes()).decode().splitlines() == single_rows
    assert inflater.eof and inflater.unused_data == b""
    assert not list(sharded.parent.glob("submit.csv.gz.rank*"))  # shards and their records are removed once assembled


def test_ensemble_under_torchrun_equals_the_single_process_ensemble(ddp_run, tmp_path):
    # A second member with other weights (the first one, perturbed), weighted 2:1, so the
    # average is not one model's output; sharding must not change a byte of the submission.
    state = load_checkpoint(ddp_run["run_dir"] / "best.pt")
    generator = torch.Generator().manual_seed(0)
    state["model"] = {k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                      for k, v in state["model"].items()}
    other = tmp_path / "other.pt"
    save_checkpoint(state, other)
    members = ["--no-train", "--ensemble", f"{ddp_run['run_dir'] / 'best.pt'} {other}", "--ensemble-weights", "2 1",
               "--data-dir", str(ddp_run["data"])]
    single, sharded = tmp_path / "single.csv.gz", tmp_path / "sharded.csv.gz"
    run_main(tmp_path, [*COMMON, *members, "--output", str(single)])
    stdout = run_main(tmp_path, [*COMMON, *members, "--output", str(sharded)], nproc=2)
    assert "ensemble of 2" in stdout
    assert sharded.read_bytes() == single.read_bytes()
    with gzip.open(sharded, "rt") as f:
        assert len(f.read().splitlines()) == 17


def test_resume_under_torchrun_continues_the_same_run(ddp_run, tmp_path):
    cwd = tmp_path / "resume"
    shutil.copytree(ddp_run["cwd"], cwd)  # a copy: the other tests keep the 1-epoch run
    stdout = run_main(cwd, [*COMMON, "--epochs", "2", "--resume", "--data-dir", str(ddp_run["data"])], nproc=2)
    run = ddp_run["run_dir"].name
    assert f"resuming run {run}" in stdout and stdout.count("epoch 2/2") == 1
    assert [p.name for p in (cwd / "output" / "models").iterdir()] == [run]
    assert load_checkpoint(cwd / "output" / "models" / run / "last.pt")["epoch"] == 1
    rows = (cwd / "logs" / run / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1"]


# ---------------------------------------------------------------- units, no processes

def test_shard_sampler_covers_every_index_once_where_distributed_sampler_pads():
    shards = [list(ShardSampler(7, r, 3)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(ShardSampler(7, r, 3)) for r in range(3)] == [3, 2, 2]
    padded = [list(DistributedSampler(range(7), num_replicas=3, rank=r, shuffle=False)) for r in range(3)]
    assert sum(map(len, padded)) == 9  # why validation does not use it


def chunk_texts(rows: list[str], chunk: int) -> list[bytes]:
    texts = ["".join(rows[i : i + chunk]) for i in range(0, len(rows), chunk)]
    texts[0] = "img,rle_mask\n" + texts[0]
    return [t.encode() for t in texts]


def single_process_file(path: Path, texts: list[bytes]) -> bytes:
    """What one process writes for these chunk texts."""
    writer = ChunkedGzipWriter(path, path.with_name(path.name + ".side"), {"fingerprint": "x", "components": {}})
    writer.recover(len(texts))
    for text in texts:
        writer.append(text)
    writer.finish()
    return path.read_bytes()


def write_shard(path: Path, texts: list[bytes]) -> Path:
    """A shard as PredictionsSaverCallback(raw=True) leaves it: bare segments plus a record."""
    segments = [deflate_chunk(t) for t in texts]
    path.write_bytes(b"".join(segments))
    chunks = [[len(seg), zlib.crc32(t), len(t)] for seg, t in zip(segments, texts)]
    marker_path(path).write_text(json.dumps({"chunks": chunks}))
    return path


def test_shards_assemble_into_the_single_process_file_one_gzip_member(tmp_path):
    names = [f"car_{i:02d}.jpg" for i in range(11)]
    rows = [f"{n},{i + 1} {i + 2}\n" for i, n in enumerate(names)]
    chunk, world = 2, 3  # 6 chunks (the last of one row) over 3 ranks
    mine = [shard_names(names, chunk, r, world) for r in range(world)]
    assert mine[0] == ["car_00.jpg", "car_01.jpg", "car_06.jpg", "car_07.jpg"]
    assert mine[2] == ["car_04.jpg", "car_05.jpg", "car_10.jpg"]
    assert sorted(sum(mine, [])) == names
    assert shard_names(names, 100, 1, 2) == []  # more ranks than chunks: nothing to do

    texts = chunk_texts(rows, chunk)
    shards = [write_shard(tmp_path / f"shard{r}", texts[r::world]) for r in range(world)]
    out = tmp_path / "submit.csv.gz"
    assemble_shards(out, shards, names, identity={"fingerprint": "f", "components": {"c": 1}})
    assert out.read_bytes() == single_process_file(tmp_path / "single.csv.gz", texts)
    inflater = zlib.decompressobj(wbits=31)
    assert inflater.decompress(out.read_bytes()).decode() == "img,rle_mask\n" + "".join(rows)
    assert inflater.eof and inflater.unused_data == b""
    assert json.loads(marker_path(out).read_text())["fingerprint"] == "f"
    assert not any(s.exists() or marker_path(s).exists() for s in shards)


def test_assembling_refuses_truncated_corrupt_or_misassigned_shards(tmp_path):
    texts = chunk_texts([f"a{i},1 1\n" for i in range(4)], 1)
    a, b = write_shard(tmp_path / "a", texts[0::2]), write_shard(tmp_path / "b", texts[1::2])
    a.write_bytes(a.read_bytes()[:-3])  # the last chunk cut short
    with pytest.raises(ValueError, match="complete chunk"):
        assemble_shards(tmp_path / "out.gz", [a, b])
    write_shard(a, texts[0::2])
    data = bytearray(b.read_bytes())
    data[2] ^= 0xFF  # a flipped byte inside chunk 1 of shard b
    b.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="(corrupt|does not match its record)"):
        assemble_shards(tmp_path / "out.gz", [a, b])
    write_shard(b, texts[1::2])
    write_shard(a, texts[0:1])  # rank 0 short of a chunk: round-robin order is broken
    with pytest.raises(ValueError, match="round-robin"):
        assemble_shards(tmp_path / "out.gz", [a, b])
    with pytest.raises(FileNotFoundError, match="shared filesystem"):
        assemble_shards(tmp_path / "out.gz", [a, tmp_path / "missing"])
    assert not (tmp_path / "out.gz").exists()
