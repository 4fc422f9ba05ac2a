"""``python main.py --dataset oxford-pet|carla|folder`` or ``--classes N`` (N >= 2): the same
stages as carvana.pipeline for multi-class segmentation.

data (adapter) -> split -> loaders -> model (N logit maps) -> train (CE + Dice, mean IoU)
-> predict (one indexed-palette PNG per image into output/<run>/masks/) -> summary.
The loaders, classifier, callbacks, checkpoints and torchrun glue are the binary path's.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
from torch.utils.data import DataLoader

from carvana.data.datasets import train_augmentation
from carvana.data.demo_trimap import CLASS_NAMES as DEMO_CLASS_NAMES, write_demo_trimap_dataset
from carvana.data.class_datasets import SegmentationDataset, collate_segmentation, load_segmentation_data
from carvana.data.palette import label_grid
from carvana.models.registry import ModelConfig, build_model, make_config, output_size, parse_size
from carvana.models.smp_nets import resolve_encoder_weights
from carvana.pipeline.binary import (LOGS_DIR, MODELS_DIR, StageTimer, classifier_from_settings, make_train_loader, resolve_run,
                              seed_everything, write_json)
from carvana.submission.fingerprint import weights_digest
from carvana.submission.masks import predict_to_masks
from carvana.training import distributed as dist
from carvana.training.checkpoint import CheckpointError, ModelSaverCallback, load_checkpoint, model_config_of
from carvana.training.logging_callbacks import ConsoleLogger, CSVLogger, PreviewLogger
from carvana.training.tasks import MULTICLASS_COLUMNS, MultiClassTask, PerClassTableLogger

DEFAULT_CLASSES = {"oxford-pet": 3, "carla": 13, "folder": 0}  # 0: must be given (the demo trimaps have 3)


def _floats(text: str, name: str) -> list[float] | None:
    try:
        return [float(x) for x in text.split(",")] if text.strip() else None
    except ValueError:
        raise ValueError(f"--{name} must be comma-separated numbers, got {text!r}") from None


def resolve_data(hp: SimpleNamespace) -> tuple[Any, int]:
    """The adapter's listed, split files and the class count (rank 0 writes the demo trimaps)."""
    dataset, classes = ("folder" if hp.dataset == "carvana" else hp.dataset), hp.classes
    root, names = Path(hp.data_dir) if hp.data_dir else None, [n.strip() for n in hp.class_names.split(",") if n.strip()]
    if hp.dataset == "carvana" and root is not None:
        raise SystemExit("Carvana masks are binary: use --classes 1, or --dataset folder|oxford-pet|carla for class masks")
    if root is None:
        if dataset != "folder":
            raise SystemExit(f"--dataset {dataset} needs --data-dir (the folder in its own layout); "
                             "--dataset folder without --data-dir runs on the demo cars as 3-class trimaps")
        root = Path(hp.data_root) / "demo-trimap"
        if dist.is_main_process():
            print("!" * 78 + f"\n!! NO --data-dir: demo cars as a 3-class trimap set (car / background / border) in {root}\n"
                  + "!" * 78)
            write_demo_trimap_dataset(root, seed=hp.seed)
        dist.barrier()
        names = names or list(DEMO_CLASS_NAMES)
        classes = classes if classes > 1 else 3
    if classes <= 1:
        classes = DEFAULT_CLASSES.get(dataset, 0)
        if not classes:
            raise SystemExit(f"--dataset {dataset} needs --classes N (N >= 2: the number of class ids in its masks)")
    data = load_segmentation_data(dataset, root, classes, hp.validation_size, hp.seed,
                                  Path(hp.test_dir) if hp.test_dir else None, names or None)
    return data, classes


def model_config_for(hp: SimpleNamespace, classes: int, input_hw: tuple[int, int]) -> ModelConfig:
    """This run's network; with --no-train --checkpoint, the checkpoint's own (classes must agree)."""
    if not hp.train and hp.checkpoint:
        config = model_config_of(load_checkpoint(Path(hp.checkpoint)), hp.checkpoint)
        if config.classes != classes:
            raise CheckpointError(f"{hp.checkpoint}: a {config.classes}-class model, but this data set has {classes} classes")
        return config
    # --arch/--encoder as in the binary path (the tutorials' recipe is --arch unet --encoder mobilenet_v2).
    config = make_config(hp.arch, hp.width, classes, input_hw, hp.encoder, hp.encoder_weights)
    if hp.train and not hp.resume:
        resolve_encoder_weights(config.encoder, config.encoder_weights)
    return config


def run_multiclass_pipeline(hp: SimpleNamespace) -> int:
    """Every stage of a multi-class run; returns the process exit code."""
    stage_done = StageTimer()
    times = stage_done.seconds

    device = dist.init(hp.device, timeout_s=hp.dist_timeout)
    main_process = dist.is_main_process()
    seed_everything(hp.seed)
    input_hw = parse_size(hp.input_size)
    run = dist.broadcast_object(resolve_run(hp) if main_process else None)
    models_dir, log_dir = MODELS_DIR / run, LOGS_DIR / run
    if main_process:
        log_dir.mkdir(parents=True, exist_ok=True)
        write_json(log_dir / "hparams.json", vars(hp))

    # 1. data
    data, classes = resolve_data(hp)
    if main_process:
        print(f"data: {data.source}: {classes} classes ({', '.join(data.class_names)}); {len(data.train_images)} train / "
              f"{len(data.valid_images)} valid images; predicting {len(data.test_images)} from {data.test_source}")
    stage_done("data")

    # 2. model, task and classifier
    config = model_config_for(hp, classes, input_hw)
    input_hw = output_size(config)  # data size; unet-original's input adds its margin
    task = MultiClassTask(classes, data.class_names, hp.ce_weight, hp.dice_weight, _floats(hp.class_weights, "class-weights"))
    classifier = classifier_from_settings(hp, build_model(config), config, device, task=task)
    pin = classifier.device.type == "cuda"
    last_path = models_dir / "last.pt"
    if hp.resume and last_path.exists():
        classifier.load_state_dict(load_checkpoint(last_path, classifier.device))
        if main_process:
            print(f"resuming run {run} from {last_path} after epoch {classifier.epoch + 1}")

    # 3. train
    if hp.train and classifier.epoch + 1 < hp.epochs:
        augment = train_augmentation(hp.seed + dist.rank()) if hp.augment else None
        train_set = SegmentationDataset(data.train_images, data.train_masks, input_hw, data.mask_kind, classes, augment,
                                        seed=hp.seed + dist.rank())
        valid_loader = None
        if data.valid_images:
            valid_set = SegmentationDataset(data.valid_images, data.valid_masks, input_hw, data.mask_kind, classes,
                                            full_masks=True)
            valid_loader = DataLoader(valid_set, batch_size=hp.batch_size, sampler=dist.ShardSampler(len(valid_set)),
                                      num_workers=hp.workers, pin_memory=pin, persistent_workers=hp.workers > 0,
                                      collate_fn=collate_segmentation)
        callbacks = [ModelSaverCallback(models_dir, vars(hp), resume_hint=f"python main.py --resume --run-name {run}"),
                     ConsoleLogger(), CSVLogger(log_dir, MULTICLASS_COLUMNS),
                     PreviewLogger(log_dir, grid_fn=lambda p: label_grid(p.images, p.truths, p.probs, data.class_names)),
                     PerClassTableLogger(log_dir)]
        classifier.train(make_train_loader(train_set, hp, pin), valid_loader, hp.epochs, callbacks)
    dist.barrier()
    stage_done("train")

    # 4. predict with the best weights: one palette PNG per image at its own size
    weights = Path(hp.checkpoint) if hp.checkpoint else models_dir / "best.pt"
    if weights.exists() or hp.checkpoint:
        classifier.load_state_dict(load_checkpoint(weights, classifier.device), weights_only=True)
    elif not hp.train:
        raise SystemExit(f"--no-train needs weights: {weights} does not exist; pass --checkpoint PATH "
                         "or the --run-name of a trained run")
    masks_dir = Path(hp.output).parent / run / "masks"
    written = predict_to_masks(classifier, data.test_images, masks_dir, input_hw, data.class_names,
                               batch_size=hp.predict_batch_size, loader_workers=hp.workers, tta=hp.tta,
                               tag=weights_digest(classifier.model.state_dict()))  # the weights' contents
    stage_done("predict")

    if main_process:
        summary = {"run": run, "data": data.source, "classes": classes, "class_names": data.class_names,
                   "model": config.describe(), "train_images": len(data.train_images),
                   "valid_images": len(data.valid_images), "predicted_from": data.test_source,
                   "masks": str(masks_dir), "masks_written": written, "epochs_trained": classifier.epoch + 1,
                   **best_epoch_figures(log_dir), "seconds_per_stage": times}
        write_json(log_dir / "summary.json", summary)
        print("\n=== summary ===")
        for key, value in summary.items():
            print(f"{key:>18}: {value}")
    dist.shutdown()
    return 0 if written == len(data.test_images) else 1


def best_epoch_figures(log_dir: Path) -> dict[str, Any]:
    """The best epoch's (by mean IoU) validation figures, from metrics.csv and per_class.csv."""
    metrics, per_class = log_dir / "metrics.csv", log_dir / "per_class.csv"
    if not (metrics.exists() and per_class.exists()):
        return {}
    rows = pd.read_csv(metrics).dropna(subset=["valid_miou"])
    if rows.empty:
        return {}
    best = rows.loc[rows["valid_miou"].idxmax()]
    table = pd.read_csv(per_class)
    table = table[table["epoch"] == best["epoch"]]
    round4 = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 4)  # noqa: E731
    return {"best_epoch": int(best["epoch"]) + 1, "best_valid_miou": round4(best["valid_miou"]),
            "best_valid_accuracy": round4(best["valid_accuracy"]),
            "best_valid_iou_per_class": {r["name"]: round4(r["iou"]) for _, r in table.iterrows()}}
