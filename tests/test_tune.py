"""``python main.py --tune N``: Optuna studies whose trials are ordinary --no-predict runs.

End to end on demo data made here (tiny trials: 64x128 inputs, width 0.125, 2-3 epochs):
two worker processes share one SQLite study to exactly N finished trials, a rerun neither
adds trials nor repeats them, best.toml reruns to its trial's figure, a worker killed with
-9 mid-trial leaves no RUNNING trial once the study is rerun, and bad storage, space files
and flags are one line each. PostgreSQL: tests/test_tune_postgres.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from carvana.data.demo.dataset import write_demo_dataset
from carvana.data.secrets import redact
from carvana.pipeline.roles import TUNABLE
from carvana.tuning import TrialReporter, make_pruner, open_storage, read_space, study_space
from carvana.tuning.space import DEFAULT_SPACES, SpaceError
from carvana.tuning.storage import StorageError

import main_helpers
from main_helpers import main_defaults

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "main.py"
SPACE = 'lr = {low = 1e-3, high = 1e-2, log = true}\nbatch_size = [2, 4]\nbce_weight = {low = 0.5, high = 1.5}\n'


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("tune-data") / "demo", seed=0, n_train_cars=6, n_test_cars=1)


def tune_args(demo: Path, study: str, n: int, *extra: str) -> list[str]:
    return [sys.executable, str(MAIN), "--tune", str(n), "--study", study, "--data-dir", str(demo),
            "--tune-space", "space.toml", "--epochs", "3", "--input-size", "64x128", "--width", "0.125",
            "--workers", "0", "--validation-size", "0.34", "--tune-pruner", "none", *extra]


def run_main(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``args`` run to the end: ``python main.py ...`` in this process (main_helpers.py), anything
    else (a launcher) as a process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if args[:2] == [sys.executable, str(MAIN)]:
        return main_helpers.run_main(cwd, *args[2:], env=env)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def load(cwd: Path, study: str, url: str = "") -> optuna.Study:
    url = url or f"sqlite:///{cwd / 'logs' / study / 'study.db'}"
    return optuna.load_study(study_name=study, storage=url)


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))


def check_shared_study(study: optuna.Study, n: int) -> None:
    """Exactly n finished trials, each number and run once, both workers ran some, and no two
    trials drew the same parameters (workers seeded alike once repeated each other's draws)."""
    done = finished(study)
    assert len(done) == n, [(t.number, t.state) for t in study.trials]
    assert len({t.number for t in done}) == n and len({t.user_attrs["run"] for t in done}) == n
    assert len({t.user_attrs["worker"] for t in done}) == 2, [t.user_attrs["worker"] for t in done]
    assert not study.get_trials(states=(TrialState.RUNNING,))
    drawn = [tuple(sorted(t.params.items())) for t in study.trials if t.params]
    assert len(set(drawn)) == len(drawn), drawn


def two_workers(args: list[str], cwd: Path) -> list[str]:
    """Run the same command in two processes at once; both succeed without a traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and "Traceback" not in out, out[-3000:]
    return outputs


def test_two_processes_share_an_sqlite_study_and_best_toml_reruns(demo, tmp_path):
    (tmp_path / "space.toml").write_text(SPACE)
    args = tune_args(demo, "shared", 4)
    two_workers(args, tmp_path)
    study = load(tmp_path, "shared")
    check_shared_study(study, 4)
    logs = tmp_path / "logs" / "shared"
    table = (logs / "trials.csv").read_text().splitlines()
    assert table[0].startswith("number,state,value,seconds") and len(table) == 1 + len(study.trials)
    assert {p.name for p in logs.glob("*.png")} >= {"optimization_history.png", "intermediate_values.png"}
    # The same command again: the study already holds N, so nothing more runs.
    again = run_main(args, tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(load(tmp_path, "shared").trials) == len(study.trials)
    # best.toml: the fixed settings and the best trial's sampled ones; rerun, the same figure.
    best = study.best_trial
    rerun = run_main([sys.executable, str(MAIN), "--config", str(logs / "best.toml"), "--no-predict",
                      "--run-name", "again"], tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads((tmp_path / "logs" / "again" / "summary.json").read_text())
    assert summary["best_valid_dice"] == pytest.approx(best.value, abs=0.003)
    assert not (tmp_path / "output" / "submit.csv.gz").exists()  # trials and --no-predict never predict


def test_a_worker_killed_mid_trial_leaves_no_running_trial(demo, tmp_path):
    (tmp_path / "space.toml").write_text(SPACE)
    args = tune_args(demo, "killed", 3, "--tune-heartbeat", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    worker = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in worker.stdout:  # kill -9 during the second trial's first epoch
        if line.startswith("##### trial 1 ("):
            break
    time.sleep(1.0)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    study = load(tmp_path, "killed")
    assert [t.number for t in study.get_trials(states=(TrialState.RUNNING,))] == [1]
    rerun = run_main(args, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    study = load(tmp_path, "killed")
    assert len(finished(study)) == 3
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert study.trials[1].state == TrialState.FAIL  # found dead by its heartbeat, its parameters run again
    retried = [t for t in finished(study) if t.system_attrs.get("failed_trial") == 1]
    assert len(retried) == 1 and retried[0].params == study.trials[1].params
    fresh = [tuple(sorted(t.params.items())) for t in finished(study) if t not in retried]
    assert len(set(fresh)) == len(fresh)  # the rerun's own draws repeat none of the first run's
    assert not (tmp_path / "output" / "models" / "killed-t000" / "last.pt").exists()  # trials keep best.pt only


def test_pruning_stops_a_clearly_worse_trial():
    study = optuna.create_study(direction="maximize", pruner=make_pruner("median", 5))
    for _ in range(3):
        trial = study.ask()
        for step in range(5):
            trial.report(0.95, step)
        study.tell(trial, 0.95)

    class Trainer:
        monitor = "valid_dice"

    good, bad = TrialReporter(study.ask()), TrialReporter(study.ask())
    for epoch in range(3):
        good.on_epoch_end(Trainer(), epoch, {"valid_dice": 0.96}, None)  # better than the median: runs on
    with pytest.raises(optuna.TrialPruned):
        for epoch in range(5):
            bad.on_epoch_end(Trainer(), epoch, {"valid_dice": 0.50}, None)
    assert bad.pruned_at == 2  # after the 2 warm-up epochs, at the first step it may
    assert isinstance(make_pruner("hyperband", 10), optuna.pruners.HyperbandPruner)


def test_journal_storage_finds_a_dead_workers_trial(tmp_path):
    storage = open_storage(f"journal:{tmp_path / 'study.log'}", heartbeat_s=1)
    study = optuna.create_study(storage=storage, study_name="j", direction="maximize")
    trial = study.ask()
    storage.record_heartbeat(trial._trial_id)
    assert storage._get_stale_trial_ids(study._study_id) == []
    time.sleep(3.2)  # grace: 3 heartbeats
    optuna.storages.fail_stale_trials(study)
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.WAITING]  # failed, and queued again


def test_space_files_are_checked(tmp_path):
    defaults = main_defaults()
    good = tmp_path / "good.toml"
    good.write_text('lr = {low = 1e-4, high = 1e-2, log = true}\nepochs = {low = 4, high = 16, step = 4}\n'
                    'optimizer = ["adamw", "sgd"]\naugment = [true, false]\nwidth = [0.25, 1]\n')
    space = {p.name: p for p in read_space(good, defaults, TUNABLE)}
    assert space["epochs"].integer and space["epochs"].step == 4 and space["lr"].log
    assert space["width"].choices == (0.25, 1.0)
    # Settings given explicitly stay fixed and leave the space.
    left = study_space(str(good), "binary", defaults, {"epochs": "command line", "lr": "recipe.toml"}, TUNABLE)
    assert {p.name for p in left} == {"optimizer", "augment", "width"}
    default = {p.name for p in DEFAULT_SPACES["binary"]}
    assert {p.name for p in study_space("", "binary", defaults, {}, TUNABLE)} == default
    # An smp network ignores --width: the default space drops it, a file naming it is refused.
    assert {p.name for p in study_space("", "binary", defaults, {}, TUNABLE, ("width",))} == default - {"width"}
    with pytest.raises(SpaceError, match="'width' does not change what these trials train"):
        study_space(str(good), "binary", defaults, {}, TUNABLE, ("width",))
    for text, words in [('lrr = [0.1]\n', "unknown setting 'lrr'"),
                        ('epochs = {low = 4.5, high = 8}\n', "'epochs'"),
                        ('optimizer = {low = 1, high = 2}\n', "list of choices"),
                        ('lr = {low = 0.01, high = 0.001}\n', "must be below"),
                        ('lr = {low = 0, high = 0.1, log = true}\n', "log range"),
                        ('epochs = 8\n', "fixed values"),
                        ('run_name = ["a", "b"]\n', "cannot be searched"),
                        ('validation_size = [0.1, 0.2]\n', "cannot be searched"),
                        ('sample_size = [0.5, 1.0]\n', "cannot be searched"),
                        ('tta = [true, false]\n', "cannot be searched"),
                        ('chunk_size = [64, 128]\n', "cannot be searched"),
                        ('augment = [1, 0]\n', "bool")]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(SpaceError, match=None) as info:
            read_space(bad, defaults, TUNABLE)
        assert str(bad) in str(info.value) and words in str(info.value), str(info.value)


def test_storage_errors_hide_the_password():
    assert redact("postgresql://me:s3cret@db:5432/x") == "postgresql://me:***@db:5432/x"
    assert redact("postgresql://:s3cret@db/x") == "postgresql://:***@db/x"  # an empty user
    assert redact("postgresql://me:s3@cr@et@db/x") == "postgresql://me:***@db/x"  # '@' inside the password
    with pytest.raises(StorageError) as info:
        open_storage("postgresql://me:s3cret@127.0.0.1:1/x", heartbeat_s=5)
    assert "s3cret" not in str(info.value) and "cannot open" in str(info.value)
    with pytest.raises(StorageError, match="not a storage URL"):
        open_storage("redis://x", heartbeat_s=5)


@pytest.mark.parametrize("extra, words", [
    (["--tune-storage", "postgresql://me:s3cret@127.0.0.1:1/x"], "--tune-storage postgresql://me:***@"),
    (["--tune-space", "nope.toml"], "nope.toml: cannot read the search space"),
    (["--resume"], "--resume: not used with --tune"),
    (["--no-train"], "cannot tune a run that does not train"),
    (["--tune-pruner", "asha"], "--tune-pruner 'asha': expected one of median, hyperband, none"),
])
def test_bad_tuning_commands_are_one_line(demo, tmp_path, extra, words):
    (tmp_path / "space.toml").write_text(SPACE)
    result = run_main(tune_args(demo, "bad", 2, *extra), tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "s3cret" not in result.stderr + result.stdout, result.stderr
    assert not (tmp_path / "logs" / "bad" / "trials.csv").exists()  # refused before any trial


def test_under_torchrun_every_rank_runs_rank_0s_trials(demo, tmp_path):
    (tmp_path / "space.toml").write_text(SPACE)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    # A rank that skipped a trial would leave the other blocked in its first DDP all-reduce: with a
    # short --dist-timeout that fails the run instead of passing, so completion means both ranks trained.
    args = tune_args(demo, "ddp", 2, "--tune-pruner", "median", "--dist-timeout", "120")
    result = run_main([*launcher, *args[1:]], tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    study = load(tmp_path, "ddp")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert result.stdout.count("##### trial 0 (") == 1  # rank 0 samples and speaks
    for t in study.trials:  # one run per trial
        metrics = (tmp_path / "logs" / t.user_attrs["run"] / "metrics.csv").read_text().splitlines()
        assert len(metrics) == 1 + 3
