"""Hostile input, generated (hypothesis): recipe files and combinations of main.py's flags.

* Random recipe TOML: every file either gives settings of main.py's own names and types, or
  is one RecipeError naming the file; nothing else escapes.
* Random combinations of flags (plans, names, resume, thresholds, teachers, sizes) run at a
  tiny size, in process: each runs (exit 0) or is refused in one ``error:`` line, never
  raises (a traceback), and never removes a file outside its own run's folders.

CI runs a bounded number of examples; CARVANA_PROPERTY_EXAMPLES=200 runs a long search
(see bench/README.md).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from carvana.data.demo.dataset import write_demo_dataset
from carvana.pipeline import main as pipeline_main
from carvana.pipeline.settings import RecipeError, read_recipe
from main_helpers import main_defaults

MAIN = Path(__file__).resolve().parents[1] / "main.py"
EXAMPLES = int(os.environ.get("CARVANA_PROPERTY_EXAMPLES", "6"))
TINY = ["--input-size", "64x64", "--width", "0.125", "--batch-size", "4", "--workers", "0", "--epochs", "1",
        "--predict-batch-size", "4", "--no-tta", "--chunk-size", "8"]

# --- recipes -----------------------------------------------------------------------------

SCALARS = st.one_of(st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False,
                                                                               width=32), st.text(max_size=12))


def toml_scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + value.encode("unicode_escape").decode().replace('"', '\\"') + '"'


KEYS = st.one_of(st.sampled_from([k.lower() for k in main_defaults()] + ["EPOCHS", "lr", "no_such_key", "folds"]),
                 st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,12}", fullmatch=True))
LINES = st.lists(st.tuples(KEYS, st.one_of(SCALARS, st.lists(SCALARS, max_size=3))), max_size=6)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=LINES, garbage=st.one_of(st.just(""), st.text(max_size=30)))
def test_a_random_recipe_is_settings_of_the_right_types_or_one_recipe_error(lines, garbage, tmp_path):
    defaults = main_defaults()
    text = "".join(f"{k} = {toml_scalar(v) if not isinstance(v, list) else '[' + ', '.join(map(toml_scalar, v)) + ']'}\n"
                   for k, v in lines) + garbage
    path = tmp_path / "recipe.toml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))  # lone surrogates too: not valid UTF-8
    try:
        values = read_recipe(path, defaults)
    except RecipeError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc).strip()
        return
    for name, value in values.items():
        assert name in defaults and type(value) is type(defaults[name]), (name, value)


# --- flag combinations -------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny demo data set and a trained run 'base' (checkpoint, ensemble member, teacher)."""
    root = tmp_path_factory.mktemp("generated")
    data = write_demo_dataset(root / "data", seed=3, n_train_cars=4, n_test_cars=1)
    ws = root / "ws"
    ws.mkdir()
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        assert pipeline_main(main_defaults(), MAIN.read_text(), "doc",
                             ["--data-dir", str(data), "--run-name", "base", "--no-predict", *TINY]) == 0
    finally:
        os.chdir(cwd)
    return data, ws


FLAGS = st.fixed_dictionaries({
    "plan": st.sampled_from([[], ["--folds", "2"], ["--folds", "2", "--fold", "1"], ["--no-train"],
                             ["--ensemble", "output/models/base"], ["--folds", "1"]]),
    "name": st.sampled_from([[], ["--run-name", "r"], ["--run-name", "base"], ["--run-name", ".."],
                             ["--run-name", "a/b"], ["--run-name", "/tmp"], ["--run-name", "é-1"]]),
    "resume": st.sampled_from([[], ["--resume"]]),
    "threshold": st.sampled_from([[], ["--threshold", "auto"], ["--threshold", "0.4"], ["--threshold", "2"]]),
    "predict": st.sampled_from([[], ["--no-predict"], ["--test-sample-size", "0.5"]]),
    "weights": st.sampled_from([[], ["--checkpoint", "output/models/base/best.pt"], ["--checkpoint", "nope.pt"]]),
    "teacher": st.sampled_from([[], ["--teacher", "output/models/base"], ["--pseudo-rounds", "2"]]),
    "odd": st.sampled_from([[], ["--batch-size", "1"], ["--input-size", "64x100"], ["--crop", "32x32"],
                            ["--epochs", "0"], ["--eval-streams", "-1"], ["--ensemble-weights", "1,2"]]),
})


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def own_folders(args: list[str]) -> tuple[str, ...]:
    """The folders a run may remove from: its own output/models/<run> and logs/<run> (and its rounds)."""
    name = args[args.index("--run-name") + 1] if "--run-name" in args else None
    if name is None:
        return ()  # a fresh timestamped run or a --resume of the latest: neither removes anything
    return (f"output/models/{name}/", f"logs/{name}/", f"output/models/{name}-round", f"logs/{name}-round")


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(flags=FLAGS)
def test_any_flag_combination_runs_or_is_one_line_and_removes_nothing_outside_its_run(flags, workspace, capsys):
    data, template = workspace
    args = [*TINY, "--data-dir", str(data), *[a for group in flags.values() for a in group]]
    ws = Path(tempfile.mkdtemp(prefix="ws-", dir=template.parent))
    shutil.copytree(template, ws, dirs_exist_ok=True)
    before, cwd = files_under(ws), os.getcwd()
    os.chdir(ws)
    try:
        code = pipeline_main(main_defaults(), MAIN.read_text(), "doc", args)  # an escaping exception fails the test
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code in (0, 1) and "Traceback" not in err, (args, err)
    assert code == 0 or len(errors) == 1, (args, err)
    own = own_folders(args)
    removed = sorted(before - files_under(ws))
    assert all(own and path.startswith(own) for path in removed), (args, removed)
    shutil.rmtree(ws)
