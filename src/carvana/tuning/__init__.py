"""Tuning: Optuna studies over main.py's settings (``python main.py --tune N``).

  space   - search spaces: the task's default, or a TOML file checked against main.py's settings
  storage - SQLite (default), PostgreSQL or journal-file studies, each with a heartbeat
  pruning - the callback that reports each epoch's figure and stops hopeless trials
  report  - trials.csv, PNG plots and best.toml (a recipe that reruns the best trial)

Imports carvana.data and carvana.training only; the study loop is carvana.pipeline.tune.
"""

from carvana.tuning.pruning import PRUNERS, TrialReporter, make_pruner
from carvana.tuning.report import finished_count, write_best_recipe, write_plots, write_trials_csv
from carvana.tuning.space import DEFAULT_SPACES, Param, SpaceError, read_space, study_space
from carvana.tuning.storage import StorageError, open_storage, redact, storage_url

__all__ = ["DEFAULT_SPACES", "PRUNERS", "Param", "SpaceError", "StorageError", "TrialReporter", "finished_count", "make_pruner",
           "open_storage", "read_space", "redact", "storage_url", "study_space", "write_best_recipe", "write_plots",
           "write_trials_csv"]
