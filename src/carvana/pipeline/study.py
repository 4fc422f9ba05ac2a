"""A study's identity and where it lives: the sampler, the refusal of a command that would
join a study with other settings, and the live-view command.

A study's identity is its objective, its searched space, and the fixed settings that decide
what a trial trains (pipeline.roles.identity: given explicitly, not machine-local, not this
command's own). A worker or rerun with another identity is refused in one line naming what
differs, so TPE and the pruner only ever compare trials trained alike.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import optuna

from carvana.data.secrets import has_password, redact, without_password
from carvana.models.registry import ModelConfigError, arch_spec
from carvana.pipeline.settings import flag_of
from carvana.tuning import Param, make_pruner, open_storage
from carvana.tuning.sampler import TrialSeededTPE


class TuneError(ValueError):
    """A study that cannot run as asked, in one line."""


def dashboard_command(url: str) -> str:
    """The ``optuna-dashboard`` command for this storage, which works as printed: a journal file
    by its path, a database URL without its password (libpq reads it from PGPASSWORD or
    ~/.pgpass, so it is never printed)."""
    if url.startswith("journal:"):
        return f"optuna-dashboard {url[len('journal:'):]}"
    if has_password(url):
        return f"PGPASSWORD=<the password> optuna-dashboard {without_password(url)}"
    return f"optuna-dashboard {url}"


def unused_by_network(hp: SimpleNamespace, given: dict[str, str]) -> tuple[str, ...]:
    """Settings the study's fixed network ignores, so they change nothing a trial trains:
    --width for an smp network (--encoder picks it), --encoder for a scratch one."""
    try:
        pretrained = arch_spec(hp.arch).pretrained_encoder
    except ModelConfigError:
        return ()  # refused with the fixed settings' other errors, before the first trial
    return ("width",) if pretrained else ("encoder",)


def open_study(hp: SimpleNamespace, url: str, space: tuple[Param, ...], objective: str,
               fixed: dict[str, Any]) -> optuna.Study:
    """Create or load the study. Its identity is the objective, the searched space and the fixed
    settings that decide what a trial trains; a command with another identity is refused,
    naming what differs."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is ours; no tracebacks
    max_steps = hp.epochs * max(hp.folds, 1)
    study = optuna.create_study(storage=open_storage(url, hp.tune_heartbeat), sampler=TrialSeededTPE(hp.seed),
                                pruner=make_pruner(hp.tune_pruner, max_steps), study_name=hp.study,
                                direction="maximize", load_if_exists=True)
    signature = json.loads(json.dumps({"objective": objective, "space": sorted(p.describe() for p in space),
                                       "fixed": fixed}, default=str))
    known = study.user_attrs.get("signature")
    if known is None:
        study.set_user_attr("signature", signature)
    elif known != signature:
        raise TuneError(f"study {hp.study} in {redact(url)} was started with other settings: "
                        f"{signature_differences(known, signature)}; give the same settings, or use another --study")
    return study


def signature_differences(known: dict[str, Any], asked: dict[str, Any]) -> str:
    """What differs between a study's recorded identity and this command's, flag by flag."""
    out = []
    if known.get("objective") != asked["objective"]:
        out.append(f"objective {known.get('objective')} here {asked['objective']}")
    if known.get("space") != asked["space"]:
        out.append(f"search space {'; '.join(known.get('space', []))} here {'; '.join(asked['space'])}")
    was, now = known.get("fixed", {}), asked["fixed"]
    for name in sorted(set(was) | set(now)):
        if was.get(name) != now.get(name):
            then = f"{flag_of(name)} {was[name]}" if name in was else f"no {flag_of(name)}"
            out.append(f"{then}, here {f'{flag_of(name)} {now[name]}' if name in now else f'no {flag_of(name)}'}")
    return "; ".join(out)
