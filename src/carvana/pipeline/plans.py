"""A run is a task (binary Carvana masks | multi-class) and a plan (single split | K folds |
ensemble of given models | predict only). This module chooses both from the settings and
refuses, before any work, a combination the code does not support, naming the flags.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from carvana.pipeline.settings import flag_of

BINARY, MULTICLASS = "binary", "multiclass"
SINGLE, FOLDS, ENSEMBLE, PREDICT = "single split", "folds", "ensemble", "predict only"

# Settings only the binary Carvana path uses (Kaggle submission, BCE/boundary loss, folds,
# ensembles), and only the multi-class path uses: given for the other task, they are refused.
BINARY_ONLY = ("hq", "threshold", "test_sample_size", "chunk_size", "postprocess_workers", "submit", "message",
               "bce_weight", "boundary_weight", "boundary_band", "boundary_dice", "ensemble", "ensemble_weights",
               "folds", "fold", "teacher", "unlabeled", "pseudo_targets", "pseudo_share", "pseudo_max_uncertain",
               "pseudo_rounds", "lovasz", "refit", "refit_budget", "refit_warm", "refit_lr", "refit_pseudo",
               "int8", "int8_max_drop")
PSEUDO = ("unlabeled", "pseudo_targets", "pseudo_share", "pseudo_max_uncertain", "pseudo_rounds")  # they shape --teacher's labels
MULTICLASS_ONLY = ("ce_weight", "class_weights", "class_names", "test_dir")


class PlanError(ValueError):
    """Settings that do not make a run, with the flags named."""


def choose_task(hp: SimpleNamespace) -> str:
    """Multi-class for --classes N >= 2 or any data set other than Carvana; binary otherwise."""
    return MULTICLASS if hp.classes > 1 or hp.dataset != "carvana" else BINARY


def choose_plan(hp: SimpleNamespace) -> str:
    """--ensemble predicts with given models; --folds trains (or, with --no-train, predicts
    with) the run's fold models; --no-train predicts with one model; else a single split."""
    if hp.ensemble:
        return ENSEMBLE
    if hp.folds:
        return FOLDS
    return SINGLE if hp.train else PREDICT


def check_plan(task: str, plan: str, hp: SimpleNamespace, given: dict[str, str]) -> None:
    """Raise PlanError for settings this task and plan cannot honour."""
    refuse = _refuser(given)
    if hp.folds == 1 or hp.folds < 0:
        raise PlanError(f"--folds {hp.folds}: use --folds K with K >= 2 (K car-grouped folds), or 0 for one split")
    if str(hp.fold).strip().lower() != "all" and not hp.folds:
        refuse("fold", "it picks one of --folds K; add --folds K")
    if hp.ensemble_weights and not hp.ensemble:
        refuse("ensemble_weights", "it weighs --ensemble members; add --ensemble")
    if hp.checkpoint and hp.train:
        refuse("checkpoint", "it names the weights --no-train predicts with, and this run trains its own model; "
                             "add --no-train, or drop --checkpoint")
    if hp.checkpoint and plan in (FOLDS, ENSEMBLE):
        refuse("checkpoint", f"{plan} predict with their own models (--ensemble takes checkpoints too)")
    if plan == ENSEMBLE:
        for name, why in (("folds", "train the folds first, then name their run folder in --ensemble"),
                          ("resume", "an ensemble trains nothing (its prediction resumes by itself)")):
            if getattr(hp, name) and name in given:
                refuse(name, f"with --ensemble: {why}")
    if not hp.predict and (plan in (ENSEMBLE, PREDICT) or not hp.train):
        what = plan if plan in (ENSEMBLE, PREDICT) else f"{plan} with --no-train"
        raise PlanError(f"--no-predict: nothing to do ({what} only predicts); drop --no-predict")
    if hp.submit and not hp.predict:
        refuse("submit", "--no-predict writes no submission to upload")
    if hp.submit and hp.test_sample_size < 1.0:
        refuse("submit", "--test-sample-size below 1 predicts only part of the test set, which Kaggle rejects")
    if task == MULTICLASS:
        for name in BINARY_ONLY:
            if name in given:
                refuse(name, "the binary Carvana path uses it, and this is a multi-class run "
                             f"(--dataset {hp.dataset}, --classes {hp.classes})")
    else:
        for name in MULTICLASS_ONLY:
            if name in given:
                refuse(name, "only multi-class runs (--dataset oxford-pet|carla|folder, --classes N) use it")
    parse_threshold(str(hp.threshold), hp.folds)
    if hp.folds:
        parse_fold(hp.fold, hp.folds)
    check_refit(hp, given)
    check_fractions(hp)
    check_student(task, plan, hp, given)


def check_fractions(hp: SimpleNamespace) -> None:
    """--ema, --lovasz, --coarse-share and --validate-from in [0, 1) (the last not with a plateau
    schedule), refused before any work (the classifier calls the same function); --tune's check
    calls this too."""
    from carvana.training.epoch import TrainingSettingError, check_training_shares  # torch: only once settings parse

    try:
        check_training_shares(hp.ema, hp.lovasz, hp.coarse_share, hp.validate_from, hp.scheduler)
    except TrainingSettingError as exc:
        raise PlanError(str(exc)) from None


def check_refit(hp: SimpleNamespace, given: dict[str, str]) -> None:
    """--refit (one more model on every car, after K folds chose the threshold out of fold) and its
    --refit-budget (minutes), --refit-warm (start from a fold) and --refit-lr; --tune's check calls this too."""
    refuse = _refuser(given)
    if hp.refit_budget < 0:
        raise PlanError(f"--refit-budget {hp.refit_budget:g}: expected minutes >= 0 (0 = the folds' own "
                        "--time-budget, or their --epochs without one)")
    if hp.refit_lr < 0:
        raise PlanError(f"--refit-lr {hp.refit_lr:g}: expected a learning rate >= 0 (0 = --lr)")
    for name, what in (("refit_budget", "the training time"), ("refit_warm", "the starting weights"),
                       ("refit_lr", "the learning rate"), ("refit_pseudo", "the pseudo-labels")):
        if name in given and not hp.refit:
            refuse(name, f"it is {what} of --refit; add --refit")
    if not hp.refit:
        return
    if not hp.folds:
        refuse("refit", "it trains on every car once K folds have chosen the threshold out of fold; add --folds K")
    if getattr(hp, "tune", 0):
        refuse("refit", "--tune's trials are selected on their OOF Dice and never predict, so a refit would be "
                        "wasted; refit the best trial (--config logs/<study>/best.toml --refit)")


def check_student(task: str, plan: str, hp: SimpleNamespace, given: dict[str, str]) -> None:
    """--teacher and the --pseudo-* settings, all checked here, before anything is removed or
    fetched. Only a run that trains uses them: ``--no-train --run-name R`` on a student run
    predicts with R's own models, whatever R's record says about its teacher."""
    refuse = _refuser(given)
    if hp.pseudo_rounds < 1:
        raise PlanError(f"--pseudo-rounds {hp.pseudo_rounds}: expected 1 (teacher -> student) or more")
    if task != BINARY:  # multi-class runs never read them (check_plan refused any given)
        return
    if not (hp.train and plan in (SINGLE, FOLDS)):
        for name in ("teacher", *PSEUDO):
            if name in given:
                refuse(name, "it shapes how a student trains on a teacher's pseudo-labels, and this run trains nothing")
        return
    own = bool(getattr(hp, "refit", False) and getattr(hp, "refit_pseudo", False))  # the folds teach the refit
    if own and hp.teacher:
        refuse("refit_pseudo", "with --teacher the refit already trains on the teacher's pseudo-labels")
    for name in PSEUDO:
        if name in given and not (hp.teacher or (own and name != "pseudo_rounds")):
            refuse(name, "it shapes the pseudo-labels of --teacher; add --teacher")
    if hp.pseudo_rounds > 1 and not hp.teacher:  # a main.py default too: round 1 would teach from nothing
        raise PlanError(f"--pseudo-rounds {hp.pseudo_rounds}: each round's student is taught by the one before, "
                        "starting from --teacher, and no --teacher is set; add --teacher or use --pseudo-rounds 1")
    if not (hp.teacher or own):
        return
    check_pseudo_settings(hp.pseudo_targets, hp.pseudo_share, hp.pseudo_max_uncertain)
    flag = "--teacher" if hp.teacher else "--refit-pseudo"
    if hp.batch_size < 2:
        raise PlanError(f"--batch-size {hp.batch_size}: {flag} mixes pseudo-labeled images into every batch, "
                        "beside at least one labeled image; use --batch-size 2 or more")
    unlabeled_parts(hp.unlabeled)
    if hp.teacher:
        teacher_paths(hp.teacher)


def check_pseudo_settings(targets: str, share: float, max_uncertain: float) -> None:
    if targets not in ("soft", "hard"):
        raise PlanError(f"--pseudo-targets {targets!r}: expected soft or hard")
    if not 0.0 < share < 1.0:
        raise PlanError(f"--pseudo-share {share}: expected a share of each batch between 0 and 1")
    if not 0.0 <= max_uncertain <= 1.0:
        raise PlanError(f"--pseudo-max-uncertain {max_uncertain}: expected a fraction in [0, 1]")


def unlabeled_parts(spec: str) -> list[str]:
    """--unlabeled: 'test' and/or existing folders (of JPEG photos), in order."""
    parts = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not parts:
        raise PlanError(f"--unlabeled {spec!r}: expected 'test', a folder of JPEG photos, or test,FOLDER")
    for part in parts:
        if part != "test" and not Path(part).is_dir():
            raise PlanError(f"--unlabeled {part!r}: expected 'test' or a folder of JPEG photos (no such folder)")
    return parts


def teacher_paths(spec: str) -> list[Path]:
    """--teacher's checkpoints (files, or run folders' fold models / best.pt), each existing."""
    from carvana.submission.ensemble import member_paths  # torch and the models: only where a teacher is
    from carvana.training.checkpoint import CheckpointError

    try:
        return member_paths(spec)
    except CheckpointError as exc:
        raise PlanError(f"--teacher: {exc}") from None


def _refuser(given: dict[str, str]):
    def refuse(name: str, why: str) -> None:
        where = f" (from {given[name]})" if given.get(name, "command line") != "command line" else ""
        raise PlanError(f"{flag_of(name)}{where}: not used here: {why}")

    return refuse


def parse_threshold(text: str, folds: int) -> tuple[bool, float]:
    """--threshold: a probability, or 'auto' (chosen on out-of-fold predictions, so --folds K)."""
    if text.strip().lower() == "auto":
        if not folds:
            raise PlanError("--threshold auto chooses on out-of-fold predictions: it needs --folds K (K >= 2)")
        return True, 0.5
    try:
        value = float(text)
    except ValueError:
        raise PlanError(f"--threshold {text!r}: expected a probability in [0, 1] or 'auto'") from None
    if not 0.0 <= value <= 1.0:
        raise PlanError(f"--threshold {value}: expected a probability in [0, 1] or 'auto'")
    return False, value


def parse_fold(text: str, k: int) -> list[int]:
    """--fold 'all' -> 0..K-1; 'N' -> [N]."""
    if str(text).strip().lower() == "all":
        return list(range(k))
    try:
        n = int(text)
    except ValueError:
        raise PlanError(f"--fold {text!r}: expected 'all' or a fold number 0..{k - 1}") from None
    if not 0 <= n < k:
        raise PlanError(f"--fold {n}: --folds {k} has folds 0..{k - 1}")
    return [n]
