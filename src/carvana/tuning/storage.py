"""Where a study lives, and how a dead worker's trial is noticed.

* ``sqlite:///FILE`` (the default, ``logs/<study>/study.db``): embedded, nothing to install;
  several processes on one machine share it.
* ``postgresql://USER:PASSWORD@HOST[:PORT]/DB``: several machines share one study through
  Optuna's RDB storage.
* ``journal:FILE``: Optuna's append-only journal file, for a filesystem several machines
  mount (NFS) where a database server is not at hand.

Every storage has a heartbeat: a worker records one every ``interval`` seconds while a trial
runs; a RUNNING trial silent for longer than the grace period (a worker killed with -9, a
lost machine) is marked FAILED when any worker next starts a trial, and its parameters are
queued again (up to ``MAX_RETRY`` times).
"""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat  # the interface Optuna's optimize loop checks
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from carvana.data.secrets import redact

MAX_RETRY = 2  # a trial whose worker died is re-run at most this many times
HEARTBEAT_KEY = "carvana:heartbeat"
# What a worker sees when another one creates the same new study database at the same moment
# (PostgreSQL, SQLite): the tables or their first rows exist by the next try.
RACES = ("duplicate key", "already exists", "UNIQUE constraint failed", "database is locked")


class StorageError(ValueError):
    """A storage that cannot be opened, named (password hidden) with the reason."""


def storage_url(setting: str, study_dir: Path) -> str:
    """--tune-storage as a URL; empty means the study's own SQLite file."""
    return setting or f"sqlite:///{study_dir / 'study.db'}"


def open_storage(url: str, heartbeat_s: int) -> optuna.storages.BaseStorage:
    """The storage ``url`` names, with a heartbeat every ``heartbeat_s`` seconds and a grace
    period of three of them; StorageError (one line) when it cannot be reached."""
    grace = 3 * heartbeat_s
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)  # the dead worker's parameters, queued again
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):])
        if not path.parent.is_dir():
            raise StorageError(f"--tune-storage {url}: folder {path.parent} does not exist")
        return HeartbeatJournalStorage(JournalFileBackend(str(path)), heartbeat_s, grace, retry)
    if not re.match(r"^(sqlite|postgresql|postgresql\+\w+|mysql|mysql\+\w+)://", url):
        raise StorageError(f"--tune-storage {redact(url)}: not a storage URL (use sqlite:///FILE, "
                           "postgresql://USER:PASSWORD@HOST/DB or journal:FILE)")
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        connect: dict[str, Any] = {"timeout": 120}  # writers from several processes wait for the lock
    else:
        connect = {"connect_timeout": 10}  # an unreachable server is an error in seconds, not minutes
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat is "experimental"
                return RDBStorage(url, engine_kwargs={"connect_args": connect, "pool_pre_ping": True},
                                  heartbeat_interval=heartbeat_s, grace_period=grace,
                                  heartbeat_stale_trial_callback=retry)
        except Exception as exc:  # sqlalchemy/driver errors: connection refused, unknown host, bad login
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__]
            if attempt < 4 and any(race in reason[0] for race in RACES):
                time.sleep(1.0 + attempt)
                continue
            raise StorageError(f"--tune-storage {redact(url)}: cannot open the study storage "
                               f"({redact(reason[0])})") from None
    raise AssertionError("unreachable")


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with the heartbeat its RDB storage has: the last beat is a
    system attribute of the trial."""

    def __init__(self, backend: Any, interval: int, grace: int, failed: Callable[[optuna.Study, FrozenTrial], None]):
        super().__init__(backend)
        self._interval, self._grace, self._failed = interval, grace, failed

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT_KEY, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return [t._trial_id for t in running
                if HEARTBEAT_KEY in t.system_attrs and now - t.system_attrs[HEARTBEAT_KEY] > self._grace]

    def get_heartbeat_interval(self) -> int | None:
        return self._interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self._failed
