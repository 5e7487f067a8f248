"""Copy an adapter folder (and any ``base_adapter/`` inside it) with its weights in bf16, for committing
under ``checkpoints/`` so that others can re-score recorded rows without retraining:

    .venv/bin/python scripts/export_adapter.py runs/sft/adapter/best checkpoints/smollm2-sft-cpu

LoRA weights are trained in fp32; bf16 halves the files (the project keeps committed adapters bf16 and
under 10 MB a file). Loading casts them back to the model's dtype, so the exported adapter is a slightly
rounded copy with its own digest: rows scored with it name that digest.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LIMIT = 10 * 1024 * 1024


def export(source: Path, target: Path) -> None:
    if target.exists():
        raise SystemExit(f"{target} exists: remove it first (committed adapters change only with their rows)")
    shutil.copytree(source, target)
    for path in target.rglob("*.safetensors"):
        tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(path).items()}
        save_file(tensors, path)
    for path in target.rglob("*.pt"):  # a row-only adapter's token row
        torch.save(torch.load(path, weights_only=True).to(torch.bfloat16), path)
    big = [p for p in target.rglob("*") if p.is_file() and p.stat().st_size > LIMIT]
    if big:
        raise SystemExit(f"over 10 MB: {big}")
    print(f"{target}: {sum(p.stat().st_size for p in target.rglob('*') if p.is_file()) / 1e6:.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args()
    export(args.source, args.target)


if __name__ == "__main__":
    main()
