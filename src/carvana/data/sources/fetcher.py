"""DatasetFetcher: get the Carvana data and split it by car.

Where the data comes from, first match wins: an explicit folder (``use_folder``, --data-dir);
the competition files mounted read-only in a Kaggle Notebook or named by ``CARVANA_INPUT``
(carvana.data.sources.mounted); a Kaggle API download when credentials exist; else the demo data.
Credentials never win over a mount. ``fetcher.source`` records which one was taken.

Download layout under ``root/<competition>[-hq]``::

    _downloads/<archive>.zip         while an archive is being fetched (deleted once unpacked)
    _downloads/<archive>.zip.done    completion marker, written only after a successful unpack
    _downloads/.fetch.lock           held while fetching: concurrent processes take turns
    .tmp-<archive>.<pid>-*/          extraction in progress (renamed into place at the end)
    train/ train_masks/ test/ train_masks.csv metadata.csv sample_submission.csv
"""

from __future__ import annotations

import csv
import errno
import math
import os
import random
import zipfile
import zlib
from pathlib import Path
from typing import Any

from carvana.data.sources import kaggle_client, mounted, notebook
from carvana.data.sources.archives import (  # noqa: F401  (re-exported: callers import them from here)
    DOWNLOADS,
    Archive,
    CorruptArchiveError,
    DatasetLayoutError,
    UnsafeArchiveError,
    archives,
    clear_leftovers,
    fetch_lock,
    is_unpacked,
    remove_path,
    unpack_archive,
    unsafe_member,
    writing_into,
    zip_problem,
)
from carvana.data.layout import COMPETITION, car_id, mask_path_for

REQUIRED_DIRS = ("train", "train_masks", "test")
REQUIRED_FILES = ("sample_submission.csv",)
OPTIONAL_FILES = ("train_masks.csv", "metadata.csv")


def check_layout(folder: Path) -> Path:
    """Raise DatasetLayoutError naming every missing piece of the Carvana layout; return the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetLayoutError(f"{folder}: data folder does not exist or is not a directory")
    missing = [f"{d}/" for d in REQUIRED_DIRS if not (folder / d).is_dir()]
    missing += [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    if missing:
        raise DatasetLayoutError(
            f"{folder}: not a Carvana data folder, missing {', '.join(missing)} (expected train/, "
            "train_masks/, test/, sample_submission.csv; train_masks.csv and metadata.csv optional)"
        )
    return folder


def _validated_fraction(value: float | None, name: str, low_inclusive: bool) -> float:
    if value is None:
        return 1.0
    ok = (0 <= value < 1) if low_inclusive else (0 < value <= 1)
    if isinstance(value, bool) or not ok:
        interval = "[0, 1)" if low_inclusive else "(0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


def split_by_car(
    images: list[Path], validation_size: float = 0.2, sample_size: float | None = None, seed: int = 0
) -> tuple[list[Path], list[Path]]:
    """Split images into (train, valid) by car id; see DatasetFetcher.get_train_files."""
    validation_size = _validated_fraction(validation_size, "validation_size", low_inclusive=True)
    sample_size = _validated_fraction(sample_size, "sample_size", low_inclusive=False)
    cars = sorted({car_id(p) for p in images})
    rng = random.Random(seed)
    kept = rng.sample(cars, math.ceil(len(cars) * sample_size)) if sample_size < 1 else list(cars)
    rng.shuffle(kept)
    n_valid = round(len(kept) * validation_size)
    if validation_size > 0 and len(kept) >= 2:
        n_valid = min(max(n_valid, 1), len(kept) - 1)  # never an empty side when avoidable
    valid_cars, train_cars = set(kept[:n_valid]), set(kept[n_valid:])
    by_name = sorted(images, key=lambda p: p.name)
    return ([p for p in by_name if car_id(p) in train_cars], [p for p in by_name if car_id(p) in valid_cars])


class DatasetFetcher:
    """Fetches the competition data and lists train/valid/test files.

    ``api`` is a kaggle ``KaggleApi``-like object; when given it is assumed authenticated and
    ``fetch`` uses it without looking for credentials. Otherwise one is made lazily.
    """

    def __init__(self, root: Path = Path("data"), competition: str = COMPETITION, hq: bool = False,
                 api: Any = None, seed: int = 0) -> None:
        self.root = Path(root)
        self.competition = competition
        self.hq = hq
        self.seed = seed
        self._api = api
        self._api_injected = api is not None
        self.dataset_dir: Path | None = None
        self.source: str | None = None  # "folder", "mount", "kaggle" or "demo"

    @property
    def api(self) -> Any:
        if self._api is None:
            self._api = kaggle_client.make_api()
        return self._api

    # ------------------------------------------------------------------ getting the data

    def _target(self) -> Path:
        return self.root / (self.competition + ("-hq" if self.hq else ""))

    def fetch(self) -> Path:
        """Take the mounted competition files, else download them, else write the demo data.

        Prints one ``data: ...`` line saying which source was taken and why.
        """
        mount = notebook.competition_mount()  # before credentials: they never outrank a mount
        if mount is not None:
            return self._use_mount(*mount)
        if not self._api_injected:
            source = kaggle_client.find_credentials()
            if source is None:
                return self._use_demo()
            print(f"data: Kaggle API download (credentials from {source}; no mounted competition files at "
                  f"{notebook.KAGGLE_INPUT_DIR} and {notebook.INPUT_ENV} unset)", flush=True)
        folder = self._target()
        with fetch_lock(folder) as held:  # other processes wait here, then find the work done
            if held:
                clear_leftovers(folder)
            for archive in archives(self.hq):
                self._fetch_archive(folder, archive)
        self.dataset_dir, self.source = check_layout(folder), "kaggle"
        return folder

    def use_folder(self, path: str | Path) -> Path:
        """Use an existing folder in the Carvana layout (e.g. ../shared/carvana-sample)."""
        self.dataset_dir, self.source = check_layout(Path(path)), "folder"
        return self.dataset_dir

    def _use_mount(self, mount: Path, why: str) -> Path:
        print(f"data: mounted competition files at {mount} ({why})", flush=True)
        folder = mounted.assemble(mount, self._target(), self.hq)
        self.dataset_dir, self.source = check_layout(folder), "mount"
        return folder

    def _use_demo(self) -> Path:
        from carvana.data.demo.dataset import write_demo_dataset  # lazy: only needed without real data

        with writing_into(self.root):  # a read-only data root: one line, not an EROFS traceback
            folder = check_layout(Path(write_demo_dataset(self.root / "demo", seed=self.seed)))
        bar = "!" * 78
        print("\n".join([
            bar,
            "!!  DEMO DATA IN USE: no mounted competition files and no Kaggle credentials",
            f"!!  found, so a small synthetic dataset was written to {folder}.",
            "!!  Scores on it say nothing about the competition. To use the real Carvana data:",
            "!!   - in a Kaggle Notebook: add the competition's data (mounted at",
            f"!!     {notebook.KAGGLE_INPUT_DIR});",
            f"!!   - or set {notebook.INPUT_ENV} to a folder holding its zips or unpacked folders;",
            f"!!   - or create an API token at {kaggle_client.TOKEN_URL}, save it as",
            "!!     ~/.kaggle/kaggle.json or set KAGGLE_USERNAME + KAGGLE_KEY, and accept",
            f"!!     the rules at {kaggle_client.rules_url(self.competition)};",
            "!!   - or pass --data-dir <folder with train/ train_masks/ test/ sample_submission.csv>.",
            bar,
        ]), flush=True)
        self.dataset_dir, self.source = folder, "demo"
        return folder

    def _fetch_archive(self, folder: Path, archive: Archive) -> None:
        zip_path = folder / DOWNLOADS / archive.name
        marker = zip_path.with_name(archive.name + ".done")
        if is_unpacked(folder, marker):
            print(f"[fetch] {archive.name}: already done")
            return
        for attempt in range(2):
            force = attempt > 0  # the retry discards whatever is on disk
            if force:
                remove_path(zip_path)
                remove_path(zip_path.with_name(archive.name + ".kaggle-partial"))
            problem = zip_problem(zip_path)
            if force or problem:
                print(f"[fetch] {archive.name}: downloading")
                problem = self._download(archive.name, zip_path, force)
            if not problem:
                try:
                    self._unpack(folder, archive, zip_path, marker)
                    return
                except (zipfile.BadZipFile, EOFError, zlib.error) as exc:  # CRC error / bad deflate data in a member
                    problem = f"corrupt data ({exc})"
            if attempt == 0:
                print(f"[fetch] {archive.name}: {problem}; downloading it again")
        raise CorruptArchiveError(f"{zip_path}: still unusable after downloading it again ({problem}); "
                                  "delete it and rerun, or check the disk")

    def _download(self, name: str, zip_path: Path, force: bool) -> str | None:
        """Ask Kaggle for one file; return a problem description if the result is not a whole zip."""
        failure: kaggle_client.KaggleError | None = None
        try:
            self.api.competition_download_file(self.competition, name, path=str(zip_path.parent),
                                               force=force, quiet=False)
        except Exception as exc:
            if isinstance(exc, ValueError) and "does not match expected size" in str(exc):
                return f"size mismatch ({kaggle_client.redact(str(exc))})"  # kaggle's Content-Length check
            failure = kaggle_client.clean_kaggle_error(exc, f"downloading {name}", self.competition, path=zip_path)
        if failure is not None:  # raised outside the except block: no unredacted exception in its chain
            raise failure
        return zip_problem(zip_path)

    def _unpack(self, folder: Path, archive: Archive, zip_path: Path, marker: Path) -> None:
        failure: kaggle_client.KaggleError | None = None
        try:
            unpack_archive(folder, archive, zip_path, marker)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            failure = kaggle_client.clean_kaggle_error(exc, f"unpacking {archive.name}", self.competition,
                                                       path=exc.filename or folder)
        if failure is not None:
            raise failure

    # ------------------------------------------------------------------ listing files

    def _folder(self) -> Path:
        if self.dataset_dir is None:
            raise RuntimeError("no dataset yet: call fetch() or use_folder() first")
        return self.dataset_dir

    def get_train_files(
        self, validation_size: float = 0.2, sample_size: float | None = None, seed: int = 0
    ) -> tuple[list[Path], list[Path], list[Path], list[Path]]:
        """Return (train_images, train_masks, valid_images, valid_masks), split by car id.

        ``sample_size`` keeps ceil(fraction * cars) cars (without replacement) before the split;
        ``validation_size`` in [0, 1) is the fraction of kept cars held out (at least one car when
        > 0 and two or more cars are kept). Seeded and deterministic; lists sorted by name.
        """
        folder = self._folder()
        images = sorted((folder / "train").glob("*.jpg"))
        if not images:
            raise DatasetLayoutError(f"{folder / 'train'}: no .jpg training images")
        masks_dir = folder / "train_masks"
        present = {p.name for p in masks_dir.iterdir()}
        orphans = [p for p in images if mask_path_for(p, masks_dir).name not in present]
        if orphans:
            raise DatasetLayoutError(
                f"{orphans[0]}: training image has no mask {mask_path_for(orphans[0], masks_dir)} "
                f"({len(orphans)} image(s) without a mask)")
        train, valid = split_by_car(images, validation_size, sample_size, seed)
        return (train, [mask_path_for(p, masks_dir) for p in train],
                valid, [mask_path_for(p, masks_dir) for p in valid])

    def get_test_files(self, sample_size: float | None = None) -> list[Path]:
        """Test images in sample_submission.csv order; ``sample_size`` keeps the first ceil(n * fraction)."""
        fraction = _validated_fraction(sample_size, "sample_size", low_inclusive=False)
        folder = self._folder()
        csv_path = folder / "sample_submission.csv"
        with csv_path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or "img" not in reader.fieldnames:
                raise ValueError(f"{csv_path}: expected a header with an 'img' column, got {reader.fieldnames}")
            names = [row["img"] for row in reader]
        if len(set(names)) != len(names):
            raise ValueError(f"{csv_path}: image names are listed more than once")
        present = set(os.listdir(folder / "test"))  # one listing instead of 100k stat calls
        paths = [folder / "test" / name for name in names]
        missing = [name for name in names if name not in present]
        if missing:
            raise DatasetLayoutError(f"{folder / 'test'}: {len(missing)} image(s) listed in {csv_path.name} are "
                                    f"missing, e.g. {', '.join(missing[:5])}")
        return paths[: math.ceil(len(paths) * fraction)]
