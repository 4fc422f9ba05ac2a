"""What a submission was made from, so that rows of two different runs are never mixed.

A prediction is identified by its *components*: the image names and their order, the
chunking, the threshold, the file format, and whatever the caller adds (TTA, input size,
model config, a hash of the weights' contents, numeric precision). Their SHA-256 is the
fingerprint. Both are stored next to the data (in the progress sidecar while predicting,
in ``<output>.json`` once finished), so a later run can tell whether it may resume or
reuse a file and, if not, say which component changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

FORMAT = "one gzip member, a full flush per chunk (v2)"


def names_digest(names: Sequence[str]) -> str:
    """Count and SHA-256 of the names in order (a reorder changes it)."""
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\n")
    return f"{len(names)} names, sha256 {h.hexdigest()[:16]}"


def weights_digest(state_dict: Mapping[str, Any]) -> str:
    """SHA-256 of a state dict's *contents* (names, dtypes, shapes, bytes), not of a file.

    The same weights give the same digest whichever file, path or mtime they came from.
    """
    import torch  # only here: the rest of this module is plain Python

    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes of any dtype (bf16 too)
    return "sha256 " + h.hexdigest()


def prediction_components(
    names: Sequence[str], chunk_size: int, threshold: float, header: bool = True, tag: str = "",
    settings: Mapping[str, Any] | None = None, level: int = 6,
) -> dict[str, Any]:
    """The components of a prediction (JSON values; ``settings`` are the caller's extras)."""
    comps: dict[str, Any] = {
        "format": f"{FORMAT}, zlib level {level}", "names": names_digest(names), "chunk_size": int(chunk_size),
        "threshold": repr(float(threshold)), "header": bool(header),
    }
    if tag:
        comps["tag"] = tag
    for key, value in (settings or {}).items():
        comps[key] = json.loads(json.dumps(value))  # tuples -> lists: what a JSON round trip gives back
    return comps


def fingerprint_of(components: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()


def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """'threshold changed (0.5 -> 0.3), ...': the components that differ (nested dicts by key)."""
    if not old:
        return "it was made by an older version (no record of its settings)"
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<none>"), new.get(key, "<none>")
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub, "<none>") != b.get(sub, "<none>"):
                    changes.append(f"{key}.{sub} changed ({_short(a.get(sub, '<none>'))} -> {_short(b.get(sub, '<none>'))})")
        else:
            changes.append(f"{key} changed ({_short(a)} -> {_short(b)})")
    return ", ".join(changes) or "its record differs"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def marker_path(path: Path) -> Path:
    """Where a finished file's record lives: ``<path>.json``."""
    return Path(path).with_name(Path(path).name + ".json")


def check_finished(path: Path, identity: Mapping[str, Any]) -> tuple[bool, str | None]:
    """(True, None) if ``path`` is a finished file made with exactly ``identity``'s components.

    Else (False, why), with ``why`` None where there is simply no file to reuse.
    The file's size and SHA-256 must match its record: a file edited or replaced since is not reused.
    """
    path = Path(path)
    if not path.exists():
        return False, None
    try:
        record = json.loads(marker_path(path).read_text())
    except FileNotFoundError:
        return False, f"{path} has no record of the settings it was made with ({marker_path(path).name})"
    except ValueError as e:
        return False, f"{marker_path(path)} is unreadable ({e})"
    if record.get("fingerprint") != identity["fingerprint"]:
        return False, f"{path} was made with other settings: {describe_changes(record.get('components') or {}, identity['components'])}"
    if record.get("bytes") != path.stat().st_size or record.get("sha256") != file_sha256(path):
        return False, f"{path} changed since it was written (size or SHA-256 differs from {marker_path(path).name})"
    return True, None


def read_record(path: Path) -> dict[str, Any]:
    """The record of a finished file (``<path>.json``); raises ValueError naming the file."""
    try:
        return json.loads(marker_path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{marker_path(path)}: cannot read the record of {path} ({e})") from e
