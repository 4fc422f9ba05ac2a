"""What each of main.py's settings *is*: the one table every rule about settings derives from.

Each setting has one kind:

* ``RUN``: part of what a run is (its data split, network, optimiser). Continuing a run with
  another value would continue a different run, so ``--resume`` refuses a contradicting flag.
* ``LEARNING``: how the run learns; read back from the record on ``--resume`` and may change.
* ``STUDENT``: ``--teacher`` and its pseudo-labels. Read back on ``--resume`` (the student goes
  on learning from its teacher), never by ``--no-train``, which only predicts with the
  student's own models.
* ``PREDICTION``: how the test set is predicted and written; trials never predict.
* ``MACHINE``: machine-local (paths, workers, device, numerics the hardware decides); not
  part of a study's identity, since two machines may share one study.
* ``INVOCATION``: asked of this command only; never read back from a record.

Besides its kind, a setting may be ``tunable`` (a study may sample it) and ``secret`` (its
value is stored and shown only through :func:`carvana.data.secrets.redact`).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from carvana.data.secrets import redact_value

RUN, LEARNING, STUDENT, PREDICTION, MACHINE, INVOCATION = "run", "learning", "student", "prediction", "machine", \
    "invocation"
# A study's identity: the fixed settings of these kinds (the others do not change what a trial trains).
IDENTITY_KINDS = (RUN, LEARNING, STUDENT)


@dataclass(frozen=True)
class Role:
    kind: str
    tunable: bool = False
    secret: bool = False


def _roles(kind: str, *names: str, tunable: bool = False, secret: bool = False) -> dict[str, Role]:
    return {name: Role(kind, tunable, secret) for name in names}


ROLES: dict[str, Role] = {
    **_roles(RUN, "dataset", "classes", "class_names", "folds", "seed", "validation_size", "sample_size", "hq"),
    # The network and optimiser define a run too, yet each trial is a fresh run: a study may sample them.
    # (width only shapes the scratch networks: pipeline/tune.py leaves it out of an smp network's space.)
    **_roles(RUN, "arch", "encoder", "width", "input_size", "optimizer", "scheduler", tunable=True),
    **_roles(LEARNING, "epochs", "freeze_encoder_epochs", "batch_size", "lr", "weight_decay", "bce_weight",
             "dice_weight", "ce_weight", "class_weights", "boundary_weight", "boundary_band", "boundary_dice",
             "grad_clip", "augment", "crop", "threshold", tunable=True),
    # A budget, a download and a decoding choice: given by the user, measured elsewhere, never searched.
    **_roles(LEARNING, "time_budget", "encoder_weights", "fast_decode"),
    # Which epochs validate: it chooses best.pt among them and buys training time, never searched.
    **_roles(LEARNING, "validate_from"),
    # Weight averaging and the Lovasz fine-tune change what a trial trains: a study may search them.
    **_roles(LEARNING, "ema", "lovasz", tunable=True),
    # Progressive resizing: cheaper early steps, so a study may search how many and how small.
    **_roles(LEARNING, "coarse_size", "coarse_share", tunable=True),
    # The refit trains after the OOF figures a study selects on, so searching it would change nothing.
    **_roles(LEARNING, "refit", "refit_budget", "refit_warm", "refit_lr", "refit_pseudo"),
    **_roles(STUDENT, "teacher", "unlabeled", "pseudo_targets", "pseudo_share", "pseudo_max_uncertain",
             "pseudo_rounds"),
    **_roles(PREDICTION, "test_sample_size", "test_dir", "tta", "tta_sizes", "predict_batch_size", "chunk_size",
             "postprocess_workers", "int8", "int8_max_drop"),
    **_roles(MACHINE, "data_dir", "data_root", "workers", "device", "amp", "engine", "eval_streams", "channels_last",
             "compile", "sync_batchnorm", "dist_timeout", "keep_last", "output"),
    **_roles(INVOCATION, "train", "resume", "run_name", "checkpoint", "fold", "ensemble", "ensemble_weights",
             "predict", "submit", "message", "tune", "study", "tune_space", "tune_pruner", "tune_timeout",
             "tune_heartbeat"),
    **_roles(INVOCATION, "tune_storage", secret=True),  # postgresql://USER:PASSWORD@HOST/DB
}


class UnknownSettingError(KeyError):
    """A setting with no role: add it to ROLES."""


def role(name: str) -> Role:
    try:
        return ROLES[name]
    except KeyError:
        raise UnknownSettingError(f"setting {name!r} has no role in carvana/pipeline/roles.py: add it to ROLES") \
            from None


def names_of(kind: str) -> tuple[str, ...]:
    return tuple(name for name, r in ROLES.items() if r.kind == kind)


RUN_DEFINING = names_of(RUN)
THIS_INVOCATION = names_of(INVOCATION)
TUNABLE = tuple(name for name, r in ROLES.items() if r.tunable)


def read_back(name: str, training: bool) -> bool:
    """Whether a continued run takes ``name`` from its record (when not given): never this
    command's own settings, and the teacher's only while the student trains."""
    kind = role(name).kind
    return kind != INVOCATION and (training or kind != STUDENT)


def recorded(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as they may be written (records, checkpoints, recipes): secrets redacted."""
    return {name: redact_value(value) if role(name).secret else value for name, value in settings.items()}


def identity(hp: SimpleNamespace, given: dict[str, str]) -> dict[str, Any]:
    """The fixed settings that decide what a study's trials train: those given explicitly
    (command line or recipe) of the kinds in IDENTITY_KINDS, sorted by name."""
    return {name: getattr(hp, name) for name in sorted(given) if role(name).kind in IDENTITY_KINDS}


def check_roles(settings: dict[str, Any]) -> None:
    """Every setting of main.py has a role, and every role names a setting (UnknownSettingError)."""
    names = {name.lower() for name in settings}
    missing, stale = sorted(names - set(ROLES)), sorted(set(ROLES) - names)
    if missing or stale:
        raise UnknownSettingError(f"settings without a role: {missing or 'none'}; roles of no setting: "
                                  f"{stale or 'none'} (carvana/pipeline/roles.py)")
