"""``--tune N``: an Optuna study over main.py's settings, whose trials are ordinary runs.

Every trial is ``python main.py`` with the study's fixed settings (everything given on the
command line or in --config), its sampled ones, ``--no-predict`` and the run name
``<study>-t<number>``: it trains (and, with --folds, scores out of fold) in its own run
folder, never predicts the test set. The objective, maximised, is the run's own record:
the best valid Dice (single split), the mean OOF Dice (--folds), or the best valid mIoU.

Workers (processes, machines) share one study through its storage; each keeps starting
trials until the study holds N finished (completed or pruned) trials, so rerunning the
command after an interruption continues the study rather than adding N more. Under torchrun
rank 0 holds the study and samples; every rank runs the same trial.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from carvana.data.secrets import redact
from carvana.pipeline import decide, run_command
from carvana.pipeline.plans import BINARY, FOLDS, MULTICLASS, SINGLE, check_fractions, check_refit, choose_plan, \
    choose_task
from carvana.pipeline.roles import INVOCATION, TUNABLE, identity, recorded, role
from carvana.pipeline.runs import check_name, logs_dir
from carvana.pipeline.session import USER_ERRORS, move_to_workspace, user_message
from carvana.pipeline.settings import Command, flag_of
from carvana.training import distributed as dist
from carvana.tuning import (Param, make_pruner, SpaceError, StorageError, TrialReporter, finished_count, storage_url, study_space, write_best_recipe, write_plots, write_trials_csv)
from carvana.tuning.report import SETTINGS_ATTR
from carvana.pipeline.study import TuneError, dashboard_command, open_study, unused_by_network

# The figure each task and plan is tuned on: (its key in the run's summary.json, its name).
OBJECTIVES = {(BINARY, SINGLE): ("best_valid_dice", "best valid Dice"),
              (BINARY, FOLDS): ("mean_oof_dice", "mean OOF Dice"),
              (MULTICLASS, SINGLE): ("best_valid_miou", "best valid mIoU")}
MAX_FAILURES_IN_A_ROW = 3  # then the worker stops: the settings, not the draw, are at fault
# Trials that hold a place among the N: finished or running. (A trial queued again after its
# worker died is WAITING: it holds no place until a worker takes it, as its own next trial.)
HOLDING_A_PLACE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


TUNE_ERRORS = (TuneError, SpaceError, StorageError)  # printed as one line, like the run's own USER_ERRORS


class SurplusTrial(Exception):
    """Another worker's trials already make up N: this one is not run (recorded FAILED)."""


def check_tune(hp: SimpleNamespace, given: dict[str, str], task: str, plan: str) -> tuple[str, str]:
    """Refuse what a study cannot honour; returns the objective (summary key, name)."""
    for name, why in (("resume", "rerun the same --tune command to continue a study"),
                      ("run_name", "trials are named <study>-t<number>; name the study with --study"),
                      ("submit", "trials never predict; run --config logs/<study>/best.toml to submit"),
                      ("checkpoint", "every trial trains its own model")):
        if getattr(hp, name) and name in given:
            raise TuneError(f"{flag_of(name)}: not used with --tune: {why}")
    if hp.tune < 0:
        raise TuneError(f"--tune {hp.tune}: expected the number of trials (N > 0)")
    if (task, plan) not in OBJECTIVES:
        raise TuneError(f"--tune: cannot tune a run that does not train ({plan}): drop --no-train / --ensemble")
    if hp.fold != "all" and plan == FOLDS:
        raise TuneError("--fold: --tune with --folds K scores every fold (the mean OOF Dice); drop --fold")
    check_refit(hp, given)  # refuses --refit: its trials never predict (each trial is checked with --tune 0)
    check_fractions(hp)
    try:  # the pruner's own check, made once, before the first trial
        make_pruner(hp.tune_pruner, max_steps=1)
    except ValueError as exc:
        raise TuneError(str(exc)) from None
    if hp.tune_timeout < 0 or hp.tune_heartbeat < 1:
        raise TuneError("--tune-timeout must be >= 0 minutes and --tune-heartbeat >= 1 second")
    check_name("--study", hp.study)
    check_name("--study", f"{hp.study}-t000")  # trials' run names: still one plain folder name
    return OBJECTIVES[(task, plan)]


def run_study(command: Command, defaults: dict[str, Any]) -> int:
    """Run trials of the study until it holds ``--tune`` finished trials; returns the exit code."""
    hp, given = command.hp, command.given
    dist.init(hp.device, timeout_s=hp.dist_timeout)  # followers wait on rank 0 from the start
    move_to_workspace(hp)
    hp.predict = False  # what a trial is: decided and checked like any --no-predict run
    task, plan = choose_task(hp), choose_plan(hp)
    objective = check_tune(hp, given, task, plan)
    space = study_space(hp.tune_space, task, defaults, given, TUNABLE, unused_by_network(hp, given))
    if not dist.is_main_process():
        follow_trials(command)
        return 0
    try:
        return lead_study(command, space, objective)
    finally:
        dist.broadcast_object(None)  # followers: no more trials (also when rank 0 stops on an error)


def lead_study(command: Command, space: tuple[Param, ...], objective: tuple[str, str]) -> int:
    """Rank 0: open the study, run trials until it holds N finished, write the outputs."""
    hp, given = command.hp, command.given
    decide(hp, given)  # the fixed settings' refusals, before the first trial
    study_dir = logs_dir(hp.study)
    study_dir.mkdir(parents=True, exist_ok=True)
    url = storage_url(hp.tune_storage, study_dir)
    study = open_study(hp, url, space, objective[1], identity(hp, given))
    fixed = recorded({k: getattr(hp, k) for k in given if role(k).kind != INVOCATION})
    print(f"study {hp.study} in {redact(url)}: maximising the {objective[1]} of {hp.tune} trials "
          f"(now {finished_count(study)} finished)\n  searching: {'; '.join(p.describe() for p in space)}\n"
          f"  fixed: {', '.join(f'{k}={v}' for k, v in fixed.items()) or 'nothing (every default is searched)'}\n"
          f"  live view:  {dashboard_command(url)}")
    loop = StudyLoop(command, study, space, objective, fixed, study_dir, url)
    try:
        loop.wait_for_room()
        if finished_count(study) < hp.tune:
            study.optimize(loop.objective, callbacks=[loop.after_trial], timeout=hp.tune_timeout * 60 or None,
                           catch=(SurplusTrial, TrialFailed), gc_after_trial=True)
    except KeyboardInterrupt:
        loop.report(plots=False)
        print(f"\ninterrupted: the running trial is recorded as failed; rerun the same command to continue study "
              f"{hp.study} ({finished_count(study)}/{hp.tune} finished)", file=sys.stderr)
        return 130
    loop.report(plots=True)
    if loop.failures >= MAX_FAILURES_IN_A_ROW:
        raise TuneError(f"{loop.failures} trials in a row failed (last: {loop.last_error}); fix the settings and "
                        "rerun the same command to continue the study")
    return 0


class TrialFailed(Exception):
    """A trial that ran but left no objective figure."""


def trial_command(command: Command, number: int, params: dict[str, Any]) -> Command:
    """The run a trial is: the study's settings, the drawn ones, no prediction, its own name."""
    hp = SimpleNamespace(**{**vars(command.hp), **params})
    hp.tune, hp.predict, hp.resume, hp.submit = 0, False, False, False
    hp.keep_last = False  # a trial is never resumed (its study runs a failed one again): best.pt only
    hp.tune_storage = redact(hp.tune_storage)  # a trial never opens the storage
    hp.run_name = f"{command.hp.study}-t{number:03d}"
    return Command(hp, {**command.given, **{k: "the tuner" for k in params}}, command.recipe, trial_of=command.hp.study)


def run_trial(command: Command, number: int, params: dict[str, Any], reporter: TrialReporter) -> dict[str, Any]:
    """Run one trial's run; returns its summary record (rank 0) or {}."""
    trial = trial_command(command, number, params)
    run_command(trial, [reporter])
    summary = logs_dir(trial.hp.run_name) / "summary.json"
    return json.loads(summary.read_text()) if dist.is_main_process() and summary.exists() else {}


def follow_trials(command: Command) -> None:
    """Ranks other than 0 under torchrun: run each trial rank 0 announces, until it says stop."""
    while (announced := dist.broadcast_object(None)) is not None:
        number, params = announced
        try:
            run_trial(command, number, params, TrialReporter(None))
        except (optuna.TrialPruned, *USER_ERRORS):
            pass  # rank 0 met the same end (refusals are broadcast, a peer's failure is a PeerFailure) and records it
        except Exception as exc:  # noqa: BLE001  this rank's own failure: said once, the study goes on
            print(f"rank {dist.rank()}: trial {number} failed: {user_message(exc)}", file=sys.stderr)


class StudyLoop:
    """Rank 0's side of the study: the objective, what follows each trial, the outputs."""

    def __init__(self, command: Command, study: optuna.Study, space: tuple[Param, ...],
                 objective: tuple[str, str], fixed: dict[str, Any], study_dir: Path, url: str) -> None:
        self.command, self.study, self.space, self.fixed, self.study_dir = command, study, space, fixed, study_dir
        self.url = url  # the storage, for the live-view command
        self.key, self.name = objective
        self.target, self.heartbeat = command.hp.tune, command.hp.tune_heartbeat
        self.failures, self.last_error = 0, ""

    def objective(self, trial: optuna.Trial) -> float:
        ahead = [t for t in self.study.get_trials(deepcopy=False)
                 if t.number < trial.number and t.state in HOLDING_A_PLACE]
        if len(ahead) >= self.target:  # another worker took the last place between our count and ask
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"trial {trial.number}: the study already has {self.target} trials")
        params = {p.name: p.suggest(trial) for p in self.space}
        run = f"{self.command.hp.study}-t{trial.number:03d}"
        trial.set_user_attr("run", run)
        trial.set_user_attr(SETTINGS_ATTR, json.loads(json.dumps(self.fixed, default=str)))  # best.toml's source
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # who ran it (trials.csv)
        print(f"\n##### trial {trial.number} ({run}): " + ", ".join(f"{k}={v}" for k, v in params.items()))
        dist.broadcast_object((trial.number, params))
        try:
            summary = run_trial(self.command, trial.number, params, TrialReporter(trial))
        except (optuna.TrialPruned, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001  any failure fails this trial, in one line; the study goes on
            raise self.failed(trial, exc) from None
        value = summary.get(self.key)
        if value is None:
            raise self.failed(trial, TrialFailed(f"run {run} left no {self.name} in its summary"))
        return float(value)

    def failed(self, trial: optuna.Trial, exc: BaseException) -> "TrialFailed":
        """The trial's failure as one line (recorded for trials.csv and printed); a CUDA
        out-of-memory also gives the cached memory back for the next trial."""
        kind = "" if isinstance(exc, (*USER_ERRORS, TrialFailed)) else f"{type(exc).__name__}: "
        message = redact(kind + user_message(exc))[:500]
        trial.set_user_attr("error", message)  # printed by print_standing, kept in trials.csv
        if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
            torch.cuda.empty_cache()
        return TrialFailed(message)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Count failures, say where the study stands, refresh trials.csv and best.toml, and stop
        (or wait for others' running trials) once N are finished."""
        surplus = trial.user_attrs.get("surplus", False)
        if trial.state == TrialState.FAIL and not surplus:
            self.failures += 1
            self.last_error = trial.user_attrs.get("error", "see the log above")
        elif trial.state != TrialState.FAIL:
            self.failures = 0
        self.report(plots=False)
        self.print_standing(trial)
        if self.failures >= MAX_FAILURES_IN_A_ROW:
            study.stop()
            return
        self.wait_for_room()
        if finished_count(study) >= self.target:
            study.stop()

    def wait_for_room(self) -> None:
        """While the trials other workers are running would make up N, wait for them to finish or
        to be found dead (their heartbeat stops), rather than starting trials that count for nothing."""
        while True:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(self.study)
            finished, running = finished_count(self.study), len(self.study.get_trials(
                deepcopy=False, states=(TrialState.RUNNING,)))
            if finished >= self.target or finished + running < self.target:
                return
            time.sleep(self.heartbeat)

    def print_standing(self, trial: FrozenTrial) -> None:
        value = f"{trial.value:.5f}" if trial.value is not None else "-"
        what = {TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}.get(trial.state, "finished")
        try:
            best = f"best so far: trial {self.study.best_trial.number}, {self.study.best_value:.5f}"
        except ValueError:
            best = "no completed trial yet"
        why = f" ({trial.user_attrs['error']})" if "error" in trial.user_attrs else ""
        print(f"##### trial {trial.number} {what}{why}: {self.name} {value}; {best} "
              f"({finished_count(self.study)}/{self.target} finished)")

    def report(self, plots: bool) -> None:
        """trials.csv and best.toml (after every trial), and the plots (at the end)."""
        write_trials_csv(self.study, self.study_dir / "trials.csv")
        written = write_best_recipe(self.study, self.name, self.study_dir / "best.toml")
        if not plots:
            return
        skipped = write_plots(self.study, self.study_dir)
        print(f"\nstudy {self.study.study_name}: {finished_count(self.study)} finished trials; trials.csv and plots "
              f"in {self.study_dir}" + (f" (not drawn yet: {', '.join(skipped)})" if skipped else ""))
        if written:
            print(f"best: trial {self.study.best_trial.number}, {self.name} {self.study.best_value:.5f}; "
                  f"rerun it with:  python main.py --config {self.study_dir / 'best.toml'}")
        print(f"live view:  {dashboard_command(self.url)}")


