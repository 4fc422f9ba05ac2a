"""What a study leaves in ``logs/<study>/``: trials.csv, PNG plots, and best.toml, the best
trial's settings as a recipe that ``python main.py --config`` runs again."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from carvana.data.files import atomic_path, write_text_atomic

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts towards --tune N
PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values")


def finished_count(study: optuna.Study) -> int:
    """Trials that count towards --tune N: completed or pruned (not failed, not running)."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def write_trials_csv(study: optuna.Study, path: Path) -> int:
    """One row per trial: number, state, value, start, duration, its run and parameters."""
    table = study.trials_dataframe(attrs=("number", "state", "value", "datetime_start", "duration", "params",
                                          "user_attrs"))
    table = table.drop(columns=[c for c in table.columns if c == f"user_attrs_{SETTINGS_ATTR}"])
    if "duration" in table:
        table.insert(3, "seconds", table.pop("duration").dt.total_seconds().round(1))
    write_text_atomic(path, table.to_csv(index=False))
    return len(table)


def write_plots(study: optuna.Study, folder: Path) -> list[str]:
    """The optimisation history, parameter importances, parallel coordinates and intermediate
    values as PNGs; a plot the study cannot draw yet (too few trials) is skipped, named."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    skipped = []
    for name in PLOTS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                axes = getattr(plots, f"plot_{name}")(study)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
            figure.set_size_inches(10, 6)
            figure.tight_layout()
            with atomic_path(folder / f"{name}.png") as tmp:
                figure.savefig(tmp, dpi=80, format="png")
        except Exception:  # e.g. importances need two completed trials with different values
            skipped.append(name)
        finally:
            plt.close("all")
    return skipped


def toml_value(value: Any) -> str:
    """A setting's value as TOML: floats keep a decimal point, strings are quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if any(c in repr(value) for c in ".en") else f"{value}.0"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))  # a TOML basic string is a JSON string for these values


SETTINGS_ATTR = "settings"  # a trial's user attribute: the fixed settings it ran with (secrets redacted)


def write_best_recipe(study: optuna.Study, objective: str, path: Path) -> bool:
    """best.toml: the best trial's own recorded fixed settings and its sampled ones, so the
    recipe is what that trial ran, whichever worker writes it. False when no trial has
    completed yet."""
    try:
        best = study.best_trial
    except ValueError:
        return False
    fixed = best.user_attrs.get(SETTINGS_ATTR, {})
    lines = [f"# Study {study.study_name!r}: trial {best.number}, {objective} {best.value:.5f}",
             f"# (run {best.user_attrs.get('run', '?')}). Run it again: python main.py --config {path}",
             "# Fixed for the study:"]
    lines += [f"{name} = {toml_value(value)}" for name, value in fixed.items() if name not in best.params]
    lines += ["# Sampled:"] + [f"{name} = {toml_value(value)}" for name, value in best.params.items()]
    write_text_atomic(path, "\n".join(lines) + "\n")
    return True
