"""Measured distance between Stage 1 on 2 gloo processes (batch B/2 each) and on 1 process (batch B).

Runs the equivalence tests (``tests/test_ddp.py``: tiny random LM, real SciFact rows; Stage 1 for 3 steps
with a validation, plain and GradCache; Stage 2 for 2 steps with its environment) and records the maximum
differences they measured, with the machine:

    .venv/bin/python benchmarks/ddp_equivalence.py

Writes ``benchmarks/results/ddp_equivalence.json`` (keys ``max_abs_update_diff_plain``,
``max_abs_update_diff_cached``, ``max_abs_loss_diff``, ``max_abs_env_diff``, ``max_abs_update_diff_rl``).
The tests themselves fail above 1e-5.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    out = ROOT / "benchmarks" / "results" / "ddp_equivalence.json"
    with tempfile.TemporaryDirectory() as tmp:
        measured = Path(tmp) / "measured.json"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_ddp.py"], cwd=ROOT, check=True,
                       env={**os.environ, "DDP_EQUIVALENCE_OUT": str(measured)})
        result = json.loads(measured.read_text())
    result.update({"tolerance": 1e-5, "processes": 2, "backend": "gloo", "steps": {"stage1": 3, "stage2": 2},
                   "seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__,
                   "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                   "command": "python benchmarks/ddp_equivalence.py"})
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
