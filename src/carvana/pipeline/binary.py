"""The binary Carvana task: every plan ends in the same streamed, validated submission.

data -> [train: a single split | K folds (+ a refit on every car)] -> the models to predict with
(the run's best.pt, its fold models or its refit, a checkpoint, or an ensemble) -> predict
(streaming) -> validate -> [upload] -> summary. Each plan only decides which models predict and
with what threshold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from carvana.data.datasets import TrainImageDataset
from carvana.data.sources.fetcher import DatasetFetcher, DatasetLayoutError
from carvana.data.mask_table import mask_table_for
from carvana.models.registry import ModelConfig, output_size
from carvana.pipeline.fit import TaskData, parse_tta_sizes, train_model, training_config
from carvana.pipeline.folds import run_folds
from carvana.pipeline.plans import ENSEMBLE, FOLDS, PREDICT, SINGLE, PlanError, parse_fold, parse_threshold
from carvana.pipeline.pseudo import finish_round, pseudo_labels, round_finished, round_session
from carvana.pipeline.refit import discard_stale_refit, finished_record, refit_folders, refit_weights, run_refit, \
    warm_start
from carvana.pipeline.session import Session, print_summary, write_json
from carvana.submission.ensemble import EnsemblePredictor, load_members, member_paths, parse_weights
from carvana.submission.sharded import predict_to_submission
from carvana.submission.validate import upload_submission, validate_submission
from carvana.training import distributed as dist
from carvana.training.checkpoint import check_settings_match, load_checkpoint, model_config_of, threshold_of


def carvana_data(session: Session) -> TaskData:
    """The Carvana files (--data-dir, else fetched or demo; rank 0 fetches, the others reuse),
    split by car, with masks decoded from train_masks.csv rows where it has them."""
    hp, fetcher = session.hp, DatasetFetcher(root=Path(session.hp.data_root), hq=session.hp.hq, seed=session.hp.seed)
    if hp.data_dir:
        fetcher.use_folder(Path(hp.data_dir))
    else:
        if session.main:
            fetcher.fetch()
        where = dist.broadcast_object((str(fetcher.dataset_dir), fetcher.source) if session.main else None)
        if not session.main:
            fetcher.use_folder(Path(where[0]))
            fetcher.source = where[1]
    # With --folds the folds hold out every car once: no separate validation split.
    validation_size = 0.0 if hp.folds else hp.validation_size
    train_images, train_masks, valid_images, valid_masks = fetcher.get_train_files(validation_size, hp.sample_size, hp.seed)
    test_images = fetcher.get_test_files(hp.test_sample_size)
    if not test_images:  # found now, not after an hour of training
        raise DatasetLayoutError(f"{fetcher.dataset_dir / 'test'}: no test images to predict")
    rles = mask_table_for(fetcher.dataset_dir)

    def make_set(images, masks, data_hw, augment, full_masks):
        return TrainImageDataset(images, masks, data_hw, augment, full_masks=full_masks, seed=hp.seed + dist.rank(),
                                 mask_rles=rles, fast_decode=hp.fast_decode)

    if session.main:
        print(f"data: {fetcher.source} at {fetcher.dataset_dir}: {len(train_images)} train / {len(valid_images)} valid "
              f"images (split by car), {len(test_images)} test images")
        print(f"masks: {f'RLE rows of {rles.path} ({len(rles)} rows; GIFs for images without one)' if rles else 'GIFs'}")
    return TaskData(fetcher.source, train_images, train_masks, valid_images, valid_masks, test_images, make_set,
                    folder=fetcher.dataset_dir, mask_rles=rles)


def run_binary(session: Session, plan: str) -> int:
    """Every stage of a binary run; returns the process exit code."""
    hp = session.hp
    data = carvana_data(session)
    session.timer("data")
    auto, threshold = parse_threshold(str(hp.threshold), hp.folds)
    info: dict[str, Any] = {"dataset_dir": str(data.folder)}
    if plan in (SINGLE, FOLDS) and hp.train:
        paths, threshold = train_students(session, data, plan, threshold, auto, info)
    elif plan == FOLDS:  # --no-train: the run's fold models as they are (nothing labeled, scored or removed)
        paths, threshold = fold_models(session, threshold, info)
    elif plan == PREDICT:
        paths = [session.prediction_weights()]
        state = load_checkpoint(paths[0])
        check_settings_match(model_config_of(state, paths[0]), {k: getattr(hp, k) for k in session.given}, paths[0])
        if "threshold" not in session.given:  # the threshold the checkpoint's run chose (--threshold auto)
            threshold = threshold_of(state)
    else:
        assert plan == ENSEMBLE, plan
        paths = member_paths(hp.ensemble)
    session.timer("train")
    if not hp.predict:
        return finish_without_predicting(session, data, paths, threshold, info)
    return submit(session, data, paths, threshold, info)


def train_students(session: Session, data: TaskData, plan: str, threshold: float, auto: bool,
                   info: dict[str, Any]) -> tuple[list[Path], float]:
    """Train the run (a single split or its folds): with --teacher, after --pseudo-rounds - 1
    earlier students (each the next round's teacher), on batches mixing in pseudo-labels. Only
    the last student refits (--refit): it is the one submitted; earlier ones teach as fold models."""
    hp = session.hp
    config, teacher = training_config(hp, 1, fresh=False), hp.teacher
    if plan == FOLDS:
        discard_stale_refit(session)
    for r in range(1, hp.pseudo_rounds if teacher else 1):  # earlier students, each the next round's teacher
        sub = round_session(session, r, parse_fold(hp.fold, hp.folds) if plan == FOLDS else None)
        if not round_finished(sub):
            train_plan(sub, data, plan, threshold, auto, pseudo_labels(sub, data, config, teacher), {}, config,
                       refit=False)
            finish_round(sub, teacher)
        teacher = str(sub.models_dir)
    pseudo = pseudo_labels(session, data, config, teacher)
    return train_plan(session, data, plan, threshold, auto, pseudo, info, config)


def fold_models(session: Session, threshold: float, info: dict[str, Any]) -> tuple[list[Path], float]:
    """--folds K --no-train: predict with the run's fold models (its refit, for a --refit run: what
    it submitted) and the threshold they record (the one OOF chose), unless --threshold is given;
    reads the run, writes nothing to it."""
    hp = session.hp
    paths = [session.models_dir / f"fold{f}" / "best.pt" for f in parse_fold(hp.fold, hp.folds)]
    if hp.refit:
        paths = [refit_weights(session, info)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise PlanError(f"--no-train needs weights: fold model(s) missing: {', '.join(missing)}; train them "
                        "(without --no-train)")
    state = load_checkpoint(paths[0])
    check_settings_match(model_config_of(state, paths[0]), {k: getattr(hp, k) for k in session.given}, paths[0])
    if "threshold" not in session.given or str(hp.threshold).strip().lower() == "auto":
        threshold = threshold_of(state)
    summary = session.log_dir / "oof_summary.json"
    if summary.is_file():
        info["mean_oof_dice"] = json.loads(summary.read_text()).get("mean_oof_dice")
    return paths, threshold


def train_plan(session: Session, data: TaskData, plan: str, threshold: float, auto: bool, pseudo: Any,
               info: dict[str, Any], config: ModelConfig, refit: bool = True) -> tuple[list[Path], float]:
    """Train a single split or the folds, then (``refit`` and --refit) a model on every car (with
    pseudo-labeled batches where ``pseudo``; with --refit-pseudo, the folds' labels of the
    unlabeled images, predicted by the run's network ``config``); returns the models to predict
    with and the threshold, and adds the run's figures to ``info``."""
    record_pseudo(info, pseudo)
    if plan == SINGLE:
        classifier = train_model(session.hp, session.device, data, (data.train_images, data.train_masks,
                                                                    data.valid_images, data.valid_masks),
                                 session.models_dir, session.log_dir, session.run, session.callbacks, pseudo)
        dist.barrier()  # rank 0 has written best.pt before any rank loads it
        # best_metric tracks -train_loss when there is no validation set: not a Dice then.
        info.update(epochs_trained=classifier.epoch + 1,
                    best_valid_dice=classifier.best_metric if data.valid_images and classifier.epoch >= 0 else None)
        return [session.models_dir / "best.pt"], threshold
    result = run_folds(session, data, threshold, auto, pseudo)
    if result.summary:
        info["mean_oof_dice"] = result.summary["mean_oof_dice"]
    if not (refit and session.hp.refit):
        return result.members, result.threshold
    start = warm_start(session.hp, result.members, result.summary)
    # Transductive: the folds label the unlabeled (test) images for the refit; a finished refit
    # (skipped by --resume) needs no labels, so the folds are not loaded for them.
    if session.hp.refit_pseudo and finished_record(refit_folders(session)[0]) is None:
        pseudo = pseudo_labels(session, data, config, result.members)
        record_pseudo(info, pseudo)
    info["refit"] = run_refit(session, data, result.threshold, pseudo, start)  # at the threshold OOF chose
    return [refit_folders(session)[0] / "best.pt"], result.threshold


def record_pseudo(info: dict[str, Any], pseudo: Any) -> None:
    """The run's figures name the pseudo-labels its training mixed in (none: nothing recorded)."""
    if pseudo is not None:
        info["pseudo_labeled_images"] = {"kept": len(pseudo.images), "labels": str(pseudo.folder)}


def finish_without_predicting(session: Session, data: TaskData, paths: list[Path], threshold: float,
                              info: dict[str, Any]) -> int:
    """--no-predict: the training summary only (a tuning trial's record); no test predictions."""
    if session.main:
        summary = {"run": session.run, "data": data.source, "train_images": len(data.train_images),
                   "valid_images": len(data.valid_images), **info, "models": [str(p) for p in paths],
                   "threshold": threshold, "seconds_per_stage": session.timer.seconds}
        write_json(session.record_name("summary"), summary)
        print_summary(summary)
    return 0


def submit(session: Session, data: TaskData, paths: list[Path], threshold: float, info: dict[str, Any]) -> int:
    """Predict the test images with ``paths`` (one model, or their average) into the submission,
    validate it, upload it when asked, and write the summary."""
    hp = session.hp
    try:
        weights = parse_weights(hp.ensemble_weights, len(paths))
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    int8 = None
    if hp.int8:  # refused here in one line where it cannot run; else each member's calibration and held-out images
        from carvana.training.quantize import plan_int8

        int8 = plan_int8(hp, session.device, data, paths, session.models_dir,
                         session.log_dir / "folds.csv" if hp.folds else None)
    # Binary models only: load_members refuses a multi-class checkpoint rather than read class 0.
    predictor = EnsemblePredictor(load_members(paths, weights, session.device, hp.amp, hp.channels_last,
                                               hp.eval_streams, hp.engine, int8.specs if int8 else None,
                                               parse_tta_sizes(hp.tta_sizes)))
    if int8:  # the accuracy gate, before any test image: a drop above --int8-max-drop is one line, exit 1
        info["int8_gate"] = int8.gate(predictor.members, threshold)
    if session.main:
        print(f"prediction: {predictor.describe()}, threshold {threshold:g}")
    names, output = [p.name for p in data.test_images], Path(hp.output)
    data_hw = output_size(predictor.members[0].config)
    rows = predict_to_submission(predictor, data.test_images, output, data_hw, threshold=threshold,
                                 chunk_size=hp.chunk_size, postprocess_workers=hp.postprocess_workers,
                                 batch_size=hp.predict_batch_size, loader_workers=hp.workers, tta=hp.tta,
                                 tag=predictor.tag(), fast_decode=hp.fast_decode)
    session.timer("predict")
    ok = True
    if session.main:
        report = validate_submission(output, names)
        print(report)
        ok = report.ok
        if hp.submit:
            upload_submission(output, names, hp.message)  # validates again and refuses an invalid file
        session.timer("validate")
        summary = {"run": session.run, "data": data.source, "train_images": len(data.train_images),
                   "valid_images": len(data.valid_images), "test_images": len(names), **info,
                   "models": [str(p) for p in paths], "threshold": threshold, "submission": str(output), "rows": rows,
                   "valid_submission": ok, "seconds_per_stage": session.timer.seconds}
        write_json(session.record_name("summary"), summary)
        print_summary(summary)
        if hp.test_sample_size >= 1.0 and ok:
            print(f"\nUpload with:  kaggle competitions submit -c carvana-image-masking-challenge -f {output} -m \"...\"\n"
                  f"         or:  python main.py --no-train --submit --run-name {session.run}")
    return 0 if ok else 1
