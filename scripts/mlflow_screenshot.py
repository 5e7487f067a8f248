"""Screenshot MLflow's compare view of one ``search-r3 test`` run's child runs, in headless Chromium.

    python scripts/mlflow_screenshot.py --run-name compare-demo --out docs/img/mlflow-compare.png

Starts ``mlflow ui`` on a free local port over the given store, opens the compare page of the newest
run with that name (its children: one per dataset, retriever and mode) and writes a PNG. It checks
what a user sees: that the experiment and its runs load in the UI, not only that the store holds them.
Needs Debian's ``chromium`` (``apt-get install chromium``); the flags keep it off the network.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from search_r3.evaluation.mlflow_runs import MODEL_TRAINING_QUERY, runs_named

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"mlflow ui did not answer at {url} within {seconds:.0f} s")


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    query = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([experiment_id])})
    return f"{base}/#/compare-runs?{query}&{MODEL_TRAINING_QUERY}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="search-r3")
    parser.add_argument("--run-name", default="compare-demo", help="the command run whose children to compare")
    parser.add_argument("--out", default="docs/img/mlflow-compare.png")
    parser.add_argument("--size", default="1600,1400", help="window width,height in pixels")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args(argv)

    client, experiment, parents = runs_named(args.tracking_uri, args.experiment, args.run_name, newest_first=True)
    parent = parents[0]
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  order_by=["attributes.run_name ASC"])
    if not children:
        raise SystemExit(f"run {parent.info.run_id} has no child runs (logged before child runs existed?)")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", args.tracking_uri,
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(f"{base}/health", 120)
        url = compare_url(base, experiment.experiment_id, [c.info.run_id for c in children])
        out = Path(args.out).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([args.chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                            f"--window-size={args.size}", "--virtual-time-budget=30000",
                            f"--screenshot={out}", url], check=True, capture_output=True, timeout=300)
        print(f"{out}: compare view of {len(children)} child runs of {args.run_name} ({parent.info.run_id})\n{url}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
