"""Runs started together against one fresh MLflow SQLite store: MLflow migrates a new database on first open
with no lock of its own, so without :func:`prepare_tracking_store` one of two runs launched at once dies in
alembic before it logs anything (seen when two Stage-2 runs were started side by side)."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from mlflow.tracking import MlflowClient

from search_r3.preflight import prepare_tracking_store


def _open_store(uri: str, start: mp.synchronize.Barrier, errors: mp.Queue) -> None:
    start.wait()
    try:
        prepare_tracking_store(uri)
        MlflowClient(tracking_uri=uri).create_experiment(f"exp-{mp.current_process().name}")
    except Exception as err:  # noqa: BLE001 - the test reports whatever a racing process hit
        errors.put(f"{type(err).__name__}: {err}")


def test_processes_opening_one_fresh_store_at_once_all_succeed(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    for attempt in range(1):  # one fresh store: without the lock, the race fails nearly every time
        uri = f"sqlite:///{tmp_path / f'mlflow-{attempt}.db'}"
        start, errors = ctx.Barrier(4), ctx.Queue()
        workers = [ctx.Process(target=_open_store, args=(uri, start, errors), name=f"p{i}") for i in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        found = []
        while not errors.empty():
            found.append(errors.get())
        assert not found, f"store {attempt}: {found}"
        assert all(w.exitcode == 0 for w in workers)
        names = {e.name for e in MlflowClient(tracking_uri=uri).search_experiments()}
        assert {f"exp-p{i}" for i in range(4)} <= names
