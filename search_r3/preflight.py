"""Checks that run before any model loads or any compute starts: every folder a command will write to
(outputs, adapters, checkpoints, caches, the MLflow store) is writable, and a checkpoint to resume from
is a readable archive. A run that would fail after an hour of encoding on an unwritable results file
fails here, in a second, with one message (:class:`~search_r3.common.errors.RunSetupError`)."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from search_r3.common.errors import RunSetupError

# init_args that name a folder or file the command writes into
WRITTEN_PATHS = {"adapter_dir", "output_dir", "results_file", "embedding_cache_dir", "dirpath", "save_dir",
                 "index_dir"}


def _walk(value: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, str(k))
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _walk(v, key)
    else:
        yield key, value


def _writable(path: Path, what: str) -> None:
    """``path`` (or, if it does not exist yet, its nearest existing ancestor) can be written."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe != path and probe.is_file():
        raise RunSetupError(f"{what} {str(path)!r} cannot be created: {str(probe)!r} is a file, not a folder")
    target = probe if probe.is_dir() else probe.parent
    if probe.exists() and not probe.is_dir() and not os.access(probe, os.W_OK):
        raise RunSetupError(f"{what} {str(path)!r} is not writable (check its permissions, or point it elsewhere)")
    if not os.access(target, os.W_OK | os.X_OK):
        raise RunSetupError(f"{what} {str(path)!r} cannot be created: {str(target)!r} is not writable (check its "
                            f"permissions, or point it elsewhere)")


def tracking_path(uri: str) -> Path | None:
    """The local file or folder behind an MLflow tracking URI (None for a server)."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        return Path(uri[len("sqlite:///"):])
    if parsed.scheme == "file":
        return Path(parsed.netloc + parsed.path or ".")
    if not parsed.scheme:
        return Path(uri)
    return None


def check_checkpoint(path: str | None) -> None:
    """A Lightning checkpoint is a zip archive (torch.save's format): a truncated or corrupt one is named
    here instead of surfacing as an unpickling traceback mid-setup."""
    if not path or path in ("last", "best", "hpc", "registry"):
        return
    file = Path(path)
    if not file.is_file():
        raise RunSetupError(f"checkpoint {path!r} does not exist (runs write theirs under "
                            f"<dirpath>/last.ckpt; see the recipe's ModelCheckpoint)")
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise RunSetupError(f"checkpoint {path!r} is corrupt or truncated ({err}); resume from an earlier one "
                            f"or start again without --ckpt_path") from err
    if bad is not None:
        raise RunSetupError(f"checkpoint {path!r} is corrupt (member {bad!r} fails its checksum); resume from "
                            f"an earlier one or start again without --ckpt_path")


def prepare_tracking_store(uri: str) -> None:
    """Create a local SQLite MLflow store's tables under a file lock. MLflow migrates a new database on
    first open without any lock of its own, so two runs started together against one fresh ``mlflow.db``
    both try to migrate it and one dies with an alembic error; run serially here, the second finds the
    tables made and opens instantly."""
    local = tracking_path(uri)
    if local is None or not uri.startswith("sqlite:"):
        return
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    local.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(local) + ".lock"):
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def preflight(config: dict[str, Any]) -> None:
    """All checks on one subcommand's resolved config (a plain dict)."""
    for key, value in _walk(config):
        if key in WRITTEN_PATHS and isinstance(value, str) and value:
            _writable(Path(value), key)
        elif key == "tracking_uri" and isinstance(value, str):
            local = tracking_path(value)
            if local is not None:
                _writable(local, "MLflow store")
                prepare_tracking_store(value)
    check_checkpoint(config.get("ckpt_path"))
