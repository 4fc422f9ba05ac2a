"""Running `python main.py ARGS` from a test: in this process (fast), or in a process of its own.

A `python main.py` subprocess spends about 5 s of a test's time importing torch, albumentations
and torch._dynamo (which torch's optimisers import on first use) before it does anything; the
suite runs about a hundred such commands. ``run_main`` runs the same entry point in the test
process instead, where those imports are already done: main.py imported as a module (its
settings block, as the parser gets it), ``carvana.pipeline.main`` called with the arguments
and the working directory given, stdout and stderr captured. What a separate interpreter would
show is kept: warnings are printed to the captured stderr as the interpreter prints them, an
escaped exception prints its traceback and exits 1, ``SystemExit`` gives its code.

``env``, as for a subprocess, is the run's whole environment: ``os.environ`` is swapped for it
during the run, and its ``OMP_NUM_THREADS`` sets torch's intra-op threads, as it would at a
process's start. Tests that need a process of its own use ``run_main_process``: variables read
when a library is imported, signals or ``kill -9``, torchrun, several runs at once, or the
interpreter's own exit.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import os
import subprocess
import sys
import traceback
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

MAIN = Path(__file__).resolve().parents[1] / "main.py"

# What a fresh interpreter does not show (its default warning filters), besides "default" for the rest.
_HIDDEN = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


@functools.lru_cache(maxsize=1)
def _main_module() -> ModuleType:
    """main.py imported once as a module: its settings and `main`, without its `__main__` block."""
    spec = importlib.util.spec_from_file_location("carvana_main_under_test", MAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main_defaults() -> dict[str, Any]:
    """main.py's settings, as its parser gets them (a new dict each call)."""
    from carvana.pipeline.settings import settings_from

    return settings_from(vars(_main_module()))


def _exit_code(exc: SystemExit, stderr: io.StringIO) -> int:
    """The interpreter's exit status for ``sys.exit(code)``."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=stderr)
    return 1


@contextlib.contextmanager
def _environment(env: dict[str, str] | None):
    """``os.environ`` is ``env`` inside (None: unchanged), torch's threads as its OMP_NUM_THREADS says."""
    import torch

    saved, threads = dict(os.environ), torch.get_num_threads()
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
        if env.get("OMP_NUM_THREADS", "").isdigit():
            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    try:
        yield
    finally:
        if env is not None:
            os.environ.clear()
            os.environ.update(saved)
        torch.set_num_threads(threads)


def run_main(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python main.py *args`` in ``cwd``, run in this process; the result as subprocess.run's."""
    from carvana.pipeline import main

    module = _main_module()
    stdout, stderr = io.StringIO(), io.StringIO()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    argv, here = sys.argv, os.getcwd()
    with (_environment(env), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr),
          warnings.catch_warnings()):
        warnings.simplefilter("default")
        for category in _HIDDEN:
            warnings.simplefilter("ignore", category)
        warnings.showwarning = show  # before pytest's recorder: the run's stderr is where they belong
        sys.argv = [str(MAIN), *args]
        os.chdir(cwd)
        try:
            code = main(main_defaults(), MAIN.read_text(), module.__doc__, list(args))
        except SystemExit as exc:
            code = _exit_code(exc, stderr)
        except Exception:  # noqa: BLE001 -- what the interpreter does with an uncaught exception
            traceback.print_exc(file=stderr)
            code = 1
        finally:
            os.chdir(here)
            sys.argv = argv
    return subprocess.CompletedProcess([sys.executable, str(MAIN), *args], code, stdout.getvalue(), stderr.getvalue())


def run_main_process(cwd: Path, *args: str, env: dict[str, str] | None = None,
                     timeout: int = 600) -> subprocess.CompletedProcess:
    """``python main.py *args`` in ``cwd``, in a process of its own (``env``: its whole environment)."""
    return subprocess.run([sys.executable, str(MAIN), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
