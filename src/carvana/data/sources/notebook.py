"""Running inside a Kaggle Notebook: where the competition files are mounted, where we may write.

A Kaggle Notebook mounts the competition's files read-only under ``/kaggle/input/<competition>/``
and gives a writable ``/kaggle/working/`` (kept as the notebook's output). Both places can be
named by environment variables, which is how tests (and users with a copy of the files
elsewhere) point the program at them:

* ``CARVANA_INPUT``: a folder laid out like the mount (zips and/or unpacked folders). Set and
  missing is an error, not a silent fall-back to another data source.
* ``CARVANA_WORKING``: the writable working folder; set to an empty string to say "no notebook".
"""

from __future__ import annotations

import os
from pathlib import Path

from carvana.data.sources.archives import DatasetLayoutError

INPUT_ENV = "CARVANA_INPUT"
WORKING_ENV = "CARVANA_WORKING"
# Module constants (not defaults baked into signatures) so tests can monkeypatch them.
KAGGLE_INPUT_DIR = Path("/kaggle/input/carvana-image-masking-challenge")
KAGGLE_WORKING_DIR = Path("/kaggle/working")


class MountNotFoundError(DatasetLayoutError):
    """CARVANA_INPUT names a folder that does not exist."""


def competition_mount() -> tuple[Path, str] | None:
    """The mounted competition folder and why it was taken, or None when there is none.

    ``CARVANA_INPUT`` (when set and not empty) wins and must exist; otherwise
    ``KAGGLE_INPUT_DIR`` when it is a folder. The reason is ``"CARVANA_INPUT"`` or
    ``"Kaggle Notebook input"``, for the console line saying which data was used.
    """
    named = os.environ.get(INPUT_ENV, "").strip()
    if named:
        folder = Path(named).expanduser()
        if not folder.is_dir():
            raise MountNotFoundError(f"{folder}: {INPUT_ENV} names a folder that does not exist "
                                     f"(unset {INPUT_ENV} to use Kaggle credentials or the demo data)")
        return folder, INPUT_ENV
    if KAGGLE_INPUT_DIR.is_dir():
        return KAGGLE_INPUT_DIR, "Kaggle Notebook input"
    return None


def _writable_dir(path: Path) -> bool:
    # os.access reports EROFS for a read-only mount even to root.
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def kaggle_working_dir() -> Path | None:
    """The Kaggle Notebook's writable working folder, or None when not running in one.

    ``CARVANA_WORKING`` overrides the place: a writable folder there is returned, anything else
    (empty, missing, read-only) gives None. Without it, ``/kaggle/working`` when it exists and
    is writable. Callers put output/ and logs/ under the returned folder.
    """
    if WORKING_ENV in os.environ:
        named = os.environ[WORKING_ENV].strip()
        folder = Path(named).expanduser() if named else None
        return folder if folder is not None and _writable_dir(folder) else None
    return KAGGLE_WORKING_DIR if _writable_dir(KAGGLE_WORKING_DIR) else None


def in_kaggle_notebook() -> bool:
    """True when a Kaggle Notebook's working folder is there (see kaggle_working_dir)."""
    return kaggle_working_dir() is not None
