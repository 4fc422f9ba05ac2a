"""A tuner you can believe: trial failures are one line and the study goes on, a study's
identity holds its fixed settings, the sampler never repeats a draw across workers, and
under torchrun a refused sampled setting fails every rank in step."""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from carvana.pipeline import main as pipeline_main
from main_helpers import main_defaults
import carvana.pipeline.tune  # noqa: F401
from carvana.tuning.sampler import TrialSeededTPE
from test_tune import SPACE, demo, load, run_main, tune_args  # noqa: F401  (demo: a fixture)

tune_module = sys.modules["carvana.pipeline.tune"]

MAIN = Path(__file__).resolve().parents[1] / "main.py"


def test_workers_seeded_alike_never_repeat_a_draw_and_one_worker_reproduces_itself():
    def params(sampler_a, sampler_b, n):
        study = optuna.create_study(direction="maximize")
        out = []
        for i in range(n):  # two workers with the same --seed taking turns on one study
            sampler = sampler_a if i % 2 == 0 else sampler_b
            study.sampler = sampler
            trial = study.ask()
            out.append((trial.suggest_float("lr", 1e-4, 1e-2, log=True), trial.suggest_categorical("b", [2, 4, 8])))
            study.tell(trial, out[-1][0])
        return out

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    first = params(TrialSeededTPE(42), TrialSeededTPE(42), 14)
    assert len(set(first)) == len(first)  # the old TPESampler(seed=42) per worker paired trials 0/1, 2/3, ...
    assert params(TrialSeededTPE(42), TrialSeededTPE(42), 14) == first  # the same --seed: the same sequence
    assert params(TrialSeededTPE(7), TrialSeededTPE(7), 14) != first


def fake_trials(monkeypatch, outcomes):
    """Replace each trial's run with the next outcome: an exception to raise or a summary."""
    queue = list(outcomes)

    def run_trial(command, number, params, reporter):
        outcome = queue.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(tune_module, "run_trial", run_trial)


def tune_in_process(tmp_path, monkeypatch, capsys, n, *extra):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.toml").write_text(SPACE)
    argv = ["--tune", str(n), "--study", "s", "--tune-space", "space.toml", "--tune-pruner", "none",
            "--input-size", "64x128", "--width", "0.125", *extra]
    code = pipeline_main(main_defaults(), MAIN.read_text(), "doc", argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_any_exception_in_a_trial_fails_that_trial_in_one_line_and_the_study_goes_on(tmp_path, monkeypatch, capsys):
    fake_trials(monkeypatch, [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                              OSError(errno.ENOSPC, "No space left on device"), {"best_valid_dice": 0.9},
                              ValueError("a sampled size the network refuses"), {"best_valid_dice": 0.8}])
    freed = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(1))
    code, out, err = tune_in_process(tmp_path, monkeypatch, capsys, 2)
    assert code == 0 and "Traceback" not in out + err, out + err
    study = load(tmp_path, "s")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE,
                                               TrialState.FAIL, TrialState.COMPLETE]
    failed = [line for line in out.splitlines() if " failed (" in line]
    assert len(failed) == 3 and "OutOfMemoryError: CUDA out of memory" in failed[0] and "No space left" in failed[1]
    assert freed == [1]  # the cached CUDA memory was given back after the out-of-memory trial
    assert "error" in (tmp_path / "logs" / "s" / "trials.csv").read_text().splitlines()[0]


def test_three_failures_in_a_row_stop_the_study_in_one_line(tmp_path, monkeypatch, capsys):
    fake_trials(monkeypatch, [RuntimeError("boom 1"), FloatingPointError("loss is not finite"),
                              KeyError("unexpected")])
    code, out, err = tune_in_process(tmp_path, monkeypatch, capsys, 2)
    lines = err.strip().splitlines()
    assert code == 1 and "Traceback" not in out + err and len(lines) == 1, err
    assert lines[0].startswith("error: 3 trials in a row failed (last: KeyError:"), lines[0]


def test_a_rerun_with_other_fixed_settings_is_refused_naming_them_and_best_toml_is_the_trials_own(
        tmp_path, monkeypatch, capsys):
    fake_trials(monkeypatch, [{"best_valid_dice": 0.9}, {"best_valid_dice": 0.95}])
    code, _, _ = tune_in_process(tmp_path, monkeypatch, capsys, 1, "--epochs", "2")
    assert code == 0
    best = (tmp_path / "logs" / "s" / "best.toml").read_text()
    assert "epochs = 2" in best and "tune_space" not in best and "lr = " in best
    code, out, err = tune_in_process(tmp_path, monkeypatch, capsys, 2, "--epochs", "6")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in out + err, err
    assert "--epochs 2, here --epochs 6" in lines[0], lines[0]
    code, out, err = tune_in_process(tmp_path, monkeypatch, capsys, 2, "--epochs", "2", "--workers", "1")
    assert code == 0, err  # a machine-local setting (--workers) is not the study's identity
    best = (tmp_path / "logs" / "s" / "best.toml").read_text()
    assert "trial 1," in best and "workers = 1" in best and "epochs = 2" in best  # trial 1's own settings


def test_under_torchrun_a_sampled_setting_rank_0_refuses_fails_every_rank_in_step(demo, tmp_path):  # noqa: F811
    (tmp_path / "space.toml").write_text(SPACE + 'threshold = ["0.5", "auto"]\n')  # auto needs --folds: refused
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = tune_args(demo, "ddp", 2, "--epochs", "1", "--dist-timeout", "120")
    result = run_main([*launcher, *args[1:]], tmp_path)
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "KeyError" not in output, output[-3000:]
    study = load(tmp_path, "ddp")
    refused = [t for t in study.trials if t.params.get("threshold") == "auto"]
    assert refused and all(t.state == TrialState.FAIL and "--threshold auto" in t.user_attrs["error"]
                           for t in refused), [(t.params, t.state) for t in study.trials]
    assert all(t.state == TrialState.COMPLETE for t in study.trials if t.params.get("threshold") == "0.5")


def test_ctrl_c_inside_a_trial_says_how_to_continue_the_study(tmp_path, monkeypatch, capsys):
    fake_trials(monkeypatch, [{"best_valid_dice": 0.9}, KeyboardInterrupt()])
    code, out, err = tune_in_process(tmp_path, monkeypatch, capsys, 3)
    assert code == 130 and "Traceback" not in out + err
    assert "rerun the same command to continue study s (1/3 finished)" in err, err
    assert load(tmp_path, "s").trials[1].state == TrialState.FAIL


def test_a_bare_resume_never_picks_a_tuning_trial(tmp_path, monkeypatch):
    from carvana.pipeline import runs

    monkeypatch.chdir(tmp_path)
    for run, record in (("mine", {}), ("s-t000", {"trial_of": "s"})):  # the trial is the newest
        (tmp_path / "output" / "models" / run).mkdir(parents=True)
        (tmp_path / "output" / "models" / run / "last.pt").write_bytes(b"x")
        (tmp_path / "logs" / run).mkdir(parents=True)
        (tmp_path / "logs" / run / "hparams.json").write_text(json.dumps(record))
    assert runs.resumable_runs() == ["mine"]
    assert runs.resume_hint("s-t000", trial_of="s").startswith("rerun the same --tune command")
