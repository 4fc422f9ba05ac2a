"""Trust at the edges: names that become paths, the table of setting roles, secrets.

Run and study names are generated (hypothesis): '..', separators, absolute paths, unicode,
control characters. A name is either refused with RunError or is one folder directly under
the run folders; nothing a fresh start removes can lie outside them. The refusals are also
run end to end: `output/` and `logs/` stay byte-identical.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from carvana.data.secrets import redact, without_password
from carvana.pipeline import runs
from carvana.pipeline.roles import (INVOCATION, ROLES, RUN_DEFINING, THIS_INVOCATION, TUNABLE, UnknownSettingError,
                                    check_roles, identity, read_back, recorded)
from carvana.pipeline.session import settings_record
from carvana.pipeline.settings import Command
import main_helpers
from main_helpers import main_defaults

MAIN = Path(__file__).resolve().parents[1] / "main.py"
PASSWORD = "s3cr3t-Pw"


# --- the table of roles ------------------------------------------------------------------

def test_every_setting_of_main_py_has_exactly_one_role():
    defaults = main_defaults()
    check_roles(defaults)  # the table and main.py agree
    with pytest.raises(UnknownSettingError, match="NEW_KNOB|new_knob"):
        check_roles({**defaults, "NEW_KNOB": 1})  # a setting added without a role fails
    with pytest.raises(UnknownSettingError, match="epochs"):
        check_roles({k: v for k, v in defaults.items() if k != "EPOCHS"})  # a role of no setting too


def test_the_old_lists_derive_from_the_table_and_no_longer_disagree():
    assert "teacher" not in THIS_INVOCATION and not read_back("teacher", training=False)  # --no-train keeps it off
    assert read_back("teacher", training=True) and read_back("epochs", training=False)
    assert not read_back("tune_storage", training=True)
    for name in ("validation_size", "sample_size", "hq", "seed", "tta", "chunk_size", "postprocess_workers",
                 "test_sample_size", "predict_batch_size", "workers", "device", "data_dir", "run_name"):
        assert name not in TUNABLE, name
    assert set(RUN_DEFINING) >= {"dataset", "arch", "input_size", "validation_size", "folds", "seed"}
    assert not set(RUN_DEFINING) & set(THIS_INVOCATION)
    assert [name for name, r in ROLES.items() if r.secret] == ["tune_storage"]


def test_a_study_identity_holds_only_what_changes_what_trials_train():
    hp = SimpleNamespace(epochs=4, workers=8, data_dir="/x", tune_storage="sqlite:///a", teacher="t", tta=False)
    given = dict.fromkeys(vars(hp), "command line")
    assert identity(hp, given) == {"epochs": 4, "teacher": "t"}  # machine, invocation and prediction left out
    assert all(ROLES[name].kind != INVOCATION for name in identity(hp, given))


# --- secrets ---------------------------------------------------------------------------

@pytest.mark.parametrize("url, shown", [
    ("postgresql://me:s3cret@db:5432/x", "postgresql://me:***@db:5432/x"),
    ("postgresql://:s3cret@db/x", "postgresql://:***@db/x"),
    ("postgresql://me:s3@cr@et@db/x", "postgresql://me:***@db/x"),
    ("postgresql+psycopg://me:p%40ss@db/x", "postgresql+psycopg://me:***@db/x"),
    ("sqlite:///logs/tune/study.db", "sqlite:///logs/tune/study.db"),
])
def test_one_redact_hides_every_password_form(url, shown):
    assert redact(url) == shown
    assert redact(f'{{"tune_storage": "{url}"}}') == f'{{"tune_storage": "{shown}"}}'  # inside a record too
    assert "cr@et" not in without_password(url) and "s3cret" not in without_password(url)


def test_settings_records_and_recipe_text_never_hold_the_password(monkeypatch):
    monkeypatch.setenv("PGPASSWORD", "from-the-environment")
    url = f"postgresql://me:{PASSWORD}@db/x"
    hp = SimpleNamespace(**{k.lower(): v for k, v in main_defaults().items()})
    hp.tune_storage = url
    recipe = {"file": "r.toml", "contents": f'tune_storage = "{url}"\nnote = "from-the-environment"\n'}
    text = json.dumps(settings_record(Command(hp, {}, recipe), "fp32"))
    assert PASSWORD not in text and "from-the-environment" not in text and "postgresql://me:***@db/x" in text
    assert PASSWORD not in json.dumps(recorded(vars(hp)))


# --- names -------------------------------------------------------------------------------

HOSTILE = st.one_of(
    st.sampled_from(["..", ".", "../..", "/", "/tmp/x", "a/b", "a\\b", "~", "~/photos", "", " ", ".hidden",
                     "a/../b", "..\\..", "x" * 101, "run\x00", "ok-run_1.2", "Überlauf", "車", "a b"]),
    st.text(min_size=0, max_size=40),
    st.text(alphabet=st.sampled_from(list("./\\~ab-_")), min_size=1, max_size=12),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=HOSTILE)
def test_a_name_is_refused_or_one_folder_inside_the_run_folders(name, tmp_path):
    try:
        runs.check_name("--run-name", name)
    except runs.RunError as exc:
        assert "--run-name" in str(exc) and "\n" not in str(exc).replace(repr(name), "")
        return
    base = (tmp_path / "output" / "models").resolve()
    path = (base / name).resolve()
    assert path.parent == base and path.name == name  # exactly one level down, no escape


def test_removal_outside_the_run_folders_is_refused_whatever_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "MODELS_DIR", tmp_path / "output" / "models")
    monkeypatch.setattr(runs, "LOGS_DIR", tmp_path / "logs")
    victim = tmp_path / "precious"
    victim.mkdir()
    for path in (runs.MODELS_DIR / "..", runs.MODELS_DIR, runs.LOGS_DIR, victim, runs.MODELS_DIR / ".." / ".." / "x"):
        with pytest.raises(runs.RunError, match="refusing to remove"):
            runs.remove_run_path(path)
    assert victim.is_dir()
    inside = runs.MODELS_DIR / "r"
    inside.mkdir(parents=True)
    runs.remove_run_path(inside)
    assert not inside.exists()


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its bytes' hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("args", [["--run-name", ".."], ["--run-name", "../.."], ["--run-name", "/tmp"],
                                  ["--run-name", "a/b"], ["--run-name", ".."] + ["--no-train"],
                                  ["--run-name", ".."] + ["--resume"], ["--tune", "2", "--study", ".."],
                                  ["--tune", "2", "--study", "a/b"]])
def test_escaping_names_are_one_line_and_touch_nothing(tmp_path, args):
    for name in ("output/models/r/best.pt", "output/submit.csv.gz", "output/pseudo/k/a.png", "logs/r/hparams.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(name.encode())
    before = tree(tmp_path)
    result = main_helpers.run_main(tmp_path, "--epochs", "1", *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: --"), result.stderr
    assert "expected one plain folder name" in lines[0]
    assert tree(tmp_path) == before  # output/ and logs/ byte-identical, nothing added or removed
