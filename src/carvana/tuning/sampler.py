"""The study's sampler: TPE whose every draw is seeded by (--seed, trial number).

Optuna's TPESampler(seed=S) draws from one sequential random stream per process. Every worker
of a study is started with the same --seed, so worker A's k-th trial and worker B's k-th trial
drew the same parameters, and a rerun after an interruption repeated trials 0, 1, 2, ...
Here each trial's random stream is seeded from (S, its trial number) before it samples:
trial numbers are unique within a study, so no two workers or reruns repeat a draw, and one
worker with a given --seed still reproduces its sequence. ``constant_liar`` makes TPE treat
other workers' running trials as bad results, so parallel workers spread out.
"""

from __future__ import annotations

import numpy as np
import optuna
from optuna.samplers import TPESampler
from optuna.trial import FrozenTrial


def trial_seed(seed: int, number: int) -> int:
    """A 32-bit seed for trial ``number`` of a study started with ``seed`` (well mixed: nearby
    seeds and numbers give unrelated streams)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, number]).generate_state(1)[0])


class TrialSeededTPE(TPESampler):
    """TPE (random start-up trials, then the tree-structured Parzen estimator), reseeded per trial."""

    def __init__(self, seed: int, **kwargs) -> None:
        super().__init__(seed=seed, constant_liar=True, **kwargs)
        self._study_seed = seed

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        seed = trial_seed(self._study_seed, trial.number)
        # Optuna's own streams (TPE's candidates, and the random start-up sampler's), reseeded.
        self._rng.rng.seed(seed)
        self._random_sampler._rng.rng.seed(seed)
        super().before_trial(study, trial)
