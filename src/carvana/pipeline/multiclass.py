"""``python main.py --dataset oxford-pet|carla|folder`` or ``--classes N`` (N >= 2): the same
run as the binary task for multi-class segmentation, with the same run, training and
checkpoint decisions (carvana.pipeline.fit, runs).

data (adapter) -> split -> [train (CE + Dice, mean IoU)] -> predict with the run's best.pt or
--checkpoint (one indexed-palette PNG per image into output/<run>/masks/) -> summary.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from carvana.data.class_datasets import SegmentationData, SegmentationDataset, collate_segmentation, \
    load_segmentation_data
from carvana.data.demo.trimap import CLASS_NAMES as DEMO_CLASS_NAMES, write_demo_trimap_dataset
from carvana.models.registry import output_size
from carvana.pipeline.fit import TaskData, classifier_for, prediction_model, task_for, train_model
from carvana.pipeline.plans import SINGLE, PlanError
from carvana.pipeline.session import Session, print_summary, write_json
from carvana.submission.fingerprint import weights_digest
from carvana.submission.masks import predict_to_masks
from carvana.submission.sharded import engine_component
from carvana.training import distributed as dist
from carvana.training.engines import attach_engine
from carvana.training.tasks import PerClassTableLogger

DEFAULT_CLASSES = {"oxford-pet": 3, "carla": 13, "folder": 0}  # 0: must be given (the demo trimaps have 3)


def class_data(session: Session) -> TaskData:
    """The data set's listed, split files as a TaskData (rank 0 writes the demo trimaps)."""
    hp = session.hp
    try:
        found = resolve_data(hp)
    except ValueError as exc:  # the adapters' own checks: class counts, names, split size
        raise PlanError(str(exc)) from None
    classes = found.classes

    def make_set(images, masks, data_hw, augment, full_masks):
        return SegmentationDataset(images, masks, data_hw, found.mask_kind, classes, augment, full_masks=full_masks,
                                   seed=hp.seed + dist.rank(), fast_decode=hp.fast_decode)

    if session.main:
        print(f"data: {found.source}: {classes} classes ({', '.join(found.class_names)}); {len(found.train_images)} "
              f"train / {len(found.valid_images)} valid images; predicting {len(found.test_images)} from "
              f"{found.test_source}")
    if not found.test_images:
        raise PlanError(f"{found.test_source or 'the data set'}: no images to predict")
    return TaskData(found.source, found.train_images, found.train_masks, found.valid_images, found.valid_masks,
                    found.test_images, make_set, collate_segmentation, found.class_names, classes,
                    test_source=found.test_source)


def resolve_data(hp: Any) -> SegmentationData:
    """The adapter's listed, split files and the class count (rank 0 writes the demo trimaps)."""
    dataset, classes = ("folder" if hp.dataset == "carvana" else hp.dataset), hp.classes
    root, names = Path(hp.data_dir) if hp.data_dir else None, [n.strip() for n in hp.class_names.split(",") if n.strip()]
    if hp.dataset == "carvana" and root is not None:
        raise PlanError("Carvana masks are binary: use --classes 1, or --dataset folder|oxford-pet|carla for class masks")
    if root is None:
        if dataset != "folder":
            raise PlanError(f"--dataset {dataset} needs --data-dir (the folder in its own layout); "
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
            raise PlanError(f"--dataset {dataset} needs --classes N (N >= 2: the number of class ids in its masks)")
    return load_segmentation_data(dataset, root, classes, hp.validation_size, hp.seed,
                                  Path(hp.test_dir) if hp.test_dir else None, names or None)


def run_multiclass(session: Session, plan: str) -> int:
    """Every stage of a multi-class run (a single split, or predict only); returns the exit code."""
    hp = session.hp
    data = class_data(session)
    session.timer("data")
    if plan == SINGLE:
        split = (data.train_images, data.train_masks, data.valid_images, data.valid_masks)
        classifier = train_model(hp, session.device, data, split, session.models_dir, session.log_dir, session.run,
                                 extra=[PerClassTableLogger(session.log_dir), *session.callbacks])
        dist.barrier()  # rank 0 has written best.pt
        epochs = classifier.epoch + 1
    weights = session.prediction_weights()
    session.timer("train")
    info = {"run": session.run, "data": data.source, "classes": data.classes, "class_names": data.class_names,
            "weights": str(weights), "train_images": len(data.train_images), "valid_images": len(data.valid_images),
            **({"epochs_trained": epochs} if plan == SINGLE else {})}
    written = predict_masks(session, data, weights, plan, info) if hp.predict else 0
    if session.main:
        summary = {**info, **best_epoch_figures(session.log_dir), "seconds_per_stage": session.timer.seconds}
        write_json(session.record_name("summary"), summary)
        print_summary(summary)
    return 0 if not hp.predict or written == len(data.test_images) else 1


def predict_masks(session: Session, data: TaskData, weights: Path, plan: str, info: dict[str, Any]) -> int:
    """Predict the test images with the best weights, in the network their checkpoint
    describes, into palette PNG masks; returns how many were written."""
    hp = session.hp
    given = {k: getattr(hp, k) for k in session.given} if plan != SINGLE else {}  # trained: the flags' own model
    model, config = prediction_model(weights, data.classes, given)
    classifier = classifier_for(hp, model, config, session.device, task_for(hp, data))
    digest = weights_digest(classifier.model.state_dict())  # the weights' contents
    attach_engine(classifier, hp.engine, digest)
    masks_dir = Path(hp.output).parent / session.run / "masks"
    written = predict_to_masks(classifier, data.test_images, masks_dir, output_size(config), data.class_names,
                               batch_size=hp.predict_batch_size, loader_workers=hp.workers, tta=hp.tta,
                               tag=digest + "".join(f" {v}" for v in engine_component(classifier).values()),
                               fast_decode=hp.fast_decode)
    session.timer("predict")
    info.update(model=config.describe(), predicted_from=data.test_source, masks=str(masks_dir), masks_written=written)
    return written


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
