"""What the scale benchmarks share: their common arguments and the one file they write into.

``benchmarks/results/scale.json`` holds one section per benchmark (``rollouts`` from ``scale.py``,
``environment`` from ``sharded_environment.py``, ...); each run replaces its own section and keeps the
others, so the file gathers the acceptance measures of several scripts run at different times.
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SCALE_JSON = ROOT / "benchmarks" / "results" / "scale.json"


def add_common_args(p: argparse.ArgumentParser) -> None:
    """``--dataset``, ``--adapter`` (the committed Stage-1 adapter) and ``--out``."""
    p.add_argument("--dataset", default="beir/scifact")
    p.add_argument("--adapter", default=str(ROOT / "checkpoints" / "smollm2-sft-cpu"))
    p.add_argument("--out", default=str(SCALE_JSON))


def provenance(command: str, **machine: Any) -> dict[str, Any]:
    """The command, the UTC date and the machine a section was measured on."""
    return {"command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                        "device": "cpu", "torch": torch.__version__, **machine}}


def write_section(out: str | Path, name: str, section: dict[str, Any]) -> Path:
    """Replace section ``name`` of the JSON file ``out``, keeping the other sections."""
    out = Path(out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    result[name] = section
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out
