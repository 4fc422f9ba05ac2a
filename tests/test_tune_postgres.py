"""--tune-storage postgresql://...: two workers on one study in a real PostgreSQL server.

The server is a throwaway cluster made here (initdb in a temp folder, run as the ``postgres``
user, on a free port, password authentication), stopped and removed at the end; no system
cluster is touched. The password given in the URL is never written: no file under output/ or
logs/ (checkpoints included) and no console line holds it.
Skipped, with the reason, where PostgreSQL's programs or the postgres user are missing.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from test_tune import check_shared_study, load, run_main, tune_args, two_workers, SPACE  # noqa: F401
from test_tune import demo  # noqa: F401  (a fixture)

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PASSWORD = "Pw-3xample-s3cr3t"


def pg_program(name: str) -> str | None:
    return shutil.which(name) or (str(PG_BIN / name) if (PG_BIN / name).exists() else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    initdb, pg_ctl = pg_program("initdb"), pg_program("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL's initdb/pg_ctl are not installed (Debian: apt install postgresql)")
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no 'postgres' user to run a throwaway cluster as")
    if os.geteuid() == user.pw_uid:
        as_postgres: list[str] = []
    elif os.geteuid() == 0:
        as_postgres = ["runuser", "-u", "postgres", "--"]
    else:
        pytest.skip("a throwaway cluster must run as the postgres user: run the tests as root or as postgres")
    folder = Path(tempfile.mkdtemp(prefix="carvana-pg-"))
    os.chown(folder, user.pw_uid, user.pw_gid)
    data, port = folder / "data", free_port()
    (folder / "pw").write_text(PASSWORD + "\n")
    os.chown(folder / "pw", user.pw_uid, user.pw_gid)
    subprocess.run([*as_postgres, initdb, "-D", str(data), "-U", "postgres", "--auth=scram-sha-256",
                    f"--pwfile={folder / 'pw'}", "--no-sync"], check=True, capture_output=True)
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*as_postgres, pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "server.log"), "-w",
                    "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_postgres, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_share_a_postgresql_study_and_never_write_its_password(demo, tmp_path, postgres_url):  # noqa: F811
    (tmp_path / "space.toml").write_text(SPACE)
    args = tune_args(demo, "pg", 4, "--tune-storage", postgres_url)
    outputs = two_workers(args, tmp_path)  # each: exit 0, no traceback
    check_shared_study(load(tmp_path, "pg", postgres_url), 4)  # no two trials with the same parameters
    assert (tmp_path / "logs" / "pg" / "best.toml").exists() and not (tmp_path / "logs" / "pg" / "study.db").exists()
    files = [p for folder in ("output", "logs") for p in (tmp_path / folder).rglob("*") if p.is_file()]
    assert any(p.name == "best.pt" for p in files) and any(p.name == "hparams.json" for p in files)
    leaked = [str(p) for p in files if PASSWORD.encode() in p.read_bytes()]  # checkpoints are stored uncompressed
    assert not leaked and not any(PASSWORD in out for out in outputs), leaked
    assert "PGPASSWORD=<the password> optuna-dashboard postgresql://postgres@127.0.0.1" in outputs[0]
    # The same study with another fixed setting: refused in one line naming it, before any trial.
    rerun = run_main(tune_args(demo, "pg", 6, "--tune-storage", postgres_url, "--epochs", "2"), tmp_path)
    lines = rerun.stderr.strip().splitlines()
    assert rerun.returncode == 1 and len(lines) == 1 and "--epochs 3, here --epochs 2" in lines[0], rerun.stderr
    assert PASSWORD not in rerun.stdout + rerun.stderr and len(load(tmp_path, "pg", postgres_url).trials) >= 4
