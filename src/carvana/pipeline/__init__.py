"""``python main.py``: settings and recipes -> a task and a plan -> one run.

  settings - main.py's flags and ``--config`` TOML recipes
  roles    - what each setting is (run-defining, per command, tunable, machine-local, secret): one table
  plans    - the task (binary | multi-class) and plan (single | folds | ensemble | predict), refusals
  runs     - which run, whose settings win on --resume, fresh starts
  session  - what every run has: device, folders, settings record, clock, user errors
  fit      - model, task, classifier, loaders and one training function for every plan
  folds    - K car-grouped folds, out-of-fold scores, threshold, error gallery
  refit    - --refit: one more model on every car once the folds chose the threshold
  binary   - the Carvana task: every plan ends in one streamed, validated submission
  multiclass - the multi-class task: palette PNG masks
  tune     - --tune N: an Optuna study whose trials are --no-predict runs
"""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any, Sequence

from carvana.pipeline.fit import parse_coarse, parse_crop, parse_tta_sizes, training_config
from carvana.pipeline.roles import check_roles
from carvana.pipeline.plans import FOLDS, MULTICLASS, PREDICT, SINGLE, PlanError, check_plan, choose_plan, choose_task
from carvana.pipeline.session import USER_ERRORS, open_session, user_message
from carvana.pipeline.settings import Command, comments_of, parse_command
from carvana.training import distributed as dist
from carvana.training.callbacks import Callback

__all__ = ["USER_ERRORS", "finish", "main", "run_command"]


def decide(hp: SimpleNamespace, given: dict[str, str]) -> tuple[str, str]:
    """The task and plan these (final) settings describe; PlanError for what cannot run."""
    task, plan = choose_task(hp), choose_plan(hp)
    check_plan(task, plan, hp, given)
    if task == MULTICLASS and plan not in (SINGLE, PREDICT):
        raise PlanError(f"{plan} are not supported for multi-class runs (--dataset {hp.dataset}, --classes "
                        f"{hp.classes}): drop --folds / --ensemble")
    check_tta_sizes(hp, task)
    if hp.train and plan in (SINGLE, FOLDS):
        # The network the settings describe, checked before anything is written or removed: its
        # size rule, --crop, --coarse-size, and (for a fresh run) its pretrained encoder weights,
        # fetched or refused offline.
        config = training_config(hp, 1, fresh=not hp.resume)
        parse_crop(hp.crop, config)
        parse_coarse(hp, config)
    return task, plan


def check_tta_sizes(hp: SimpleNamespace, task: str) -> None:
    """--tta-sizes: sizes that parse, and none of the paths that cannot honour them (one line).
    With --teacher / --refit-pseudo the sizes are the run's own predictions' (OOF and test); the
    teacher labels at its own size, so its label store is the one a run without them uses."""
    if not parse_tta_sizes(hp.tta_sizes):
        return
    for refused, why in ((task == MULTICLASS, "multi-class prediction runs one size"),
                         (hp.int8, "--int8 calibrates and gates its graph at the model's own size")):
        if refused:
            raise PlanError(f"--tta-sizes {hp.tta_sizes}: not with this run: {why}")


def run_command(command: Command, callbacks: Sequence[Callback] = ()) -> int:
    """Run what ``command`` asks for (``callbacks`` join every model's training); returns the
    process exit code."""
    session = open_session(command, lambda hp: decide(hp, command.given), callbacks)
    if session.task == MULTICLASS:
        from carvana.pipeline.multiclass import run_multiclass  # each task imports only its own stages

        return run_multiclass(session, session.plan)
    from carvana.pipeline.binary import run_binary

    return run_binary(session, session.plan)


def tune_command(command: Command, defaults: dict[str, Any]) -> int:
    """--tune N (Optuna is imported only by a tuning run)."""
    from carvana.pipeline.tune import TUNE_ERRORS, run_study

    try:
        return run_study(command, defaults)
    except TUNE_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def main(defaults: dict[str, Any], source: str, doc: str, argv: Sequence[str] | None = None) -> int:
    """main.py's entry: parse, run, and print user errors as one line (completed work is kept)."""
    check_roles(defaults)  # a setting added to main.py without a role fails here, before anything runs
    try:
        command = parse_command(defaults, argv, comments_of(source), doc.strip().splitlines()[0])
        if command.hp.tune:
            return tune_command(command, defaults)
        return run_command(command)
    except USER_ERRORS as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return 1
    finally:
        dist.shutdown()  # torchrun's process group, once every run of this process is over


def finish(code: int) -> int:
    """The process's exit, after main(): under torchrun, once the process group is shut down and
    every file is written, the process ends at once (``os._exit``) instead of through the
    interpreter's teardown. There the transport's C++ threads could still be running while
    static destructors ran, and a rank whose work was finished and written aborted
    ("terminate called without an active exception", SIGABRT), failing the whole job."""
    if not dist.launched_by_torchrun():
        return code
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
