#!/usr/bin/env bash
# Stage 1 on one GPU, end to end: the GPU recipe (configs/sft-gpu.yaml), its two ablations, its NFCorpus
# variant and the CPU recipe (configs/sft.yaml) are trained side by side, then every adapter that
# finished is tested in one table (configs/sft-gpu-table.yaml) and recorded in docs/results.json.
#
# Why side by side: one fit of a 135M-parameter model does not fill a data-centre GPU, so the others use
# what it leaves idle. How much that saves against running them one after another is not measured (the
# utilisation, memory and step times of the H200 run are in the README, Stage 1, "GPU recipe").
# MAX_TIME (Lightning's max_time, DD:HH:MM:SS) bounds each fit so the script fits a fixed time slot; a fit
# cut short keeps the best adapter of the validations it reached. Unset, every fit runs to its max_steps.
#
#   scripts/gpu_stage1.sh                              # every recipe to the end
#   LOGGER=csv MAX_TIME=00:00:04:00 scripts/gpu_stage1.sh   # as run on a lent H200 (README, Stage 1)
#   LOGGER=csv scripts/gpu_stage1.sh                   # where MLflow is not installed: CSV logs instead
#   FIT_ARGS='--trainer.max_steps 2' scripts/gpu_stage1.sh   # extra arguments for every fit (TEST_ARGS: the table)
#
# Logs, per-phase wall times and GPU memory samples land in runs/gpu-stage1/.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
MAX_TIME=${MAX_TIME:-}
LOGGER=${LOGGER:-mlflow}
read -r -a FIT_EXTRA <<< "${FIT_ARGS:-}"
read -r -a TEST_EXTRA <<< "${TEST_ARGS:-}"
OUT_DIR=runs/gpu-stage1
mkdir -p "$OUT_DIR"
export TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

logger_args() {  # $1: run name
  if [ "$LOGGER" = csv ]; then
    echo "--trainer.logger=lightning.pytorch.loggers.CSVLogger --trainer.logger.init_args.save_dir=$OUT_DIR/csv --trainer.logger.init_args.name=$1"
  fi
}

stamp() { date +%s; }
t0=$(stamp)
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT_DIR/gpu.txt"
  (while true; do nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits; sleep 5; done) \
    > "$OUT_DIR/gpu_samples.csv" 2>/dev/null &
  sampler=$!
fi

fit() {  # $1: run name, then the configs
  local name=$1; shift
  local start; start=$(stamp)
  # shellcheck disable=SC2046
  "$PY" -m search_r3.cli fit "$@" ${MAX_TIME:+--trainer.max_time "$MAX_TIME"} $(logger_args "$name") "${FIT_EXTRA[@]}" \
    > "$OUT_DIR/fit-$name.log" 2>&1
  local rc=$?
  echo "fit $name: exit $rc, $(( $(stamp) - start )) s" | tee -a "$OUT_DIR/times.txt"
}

pids=()
fit sft-gpu --config configs/sft.yaml --config configs/sft-gpu.yaml & pids+=($!)
fit sft-gpu-attn --config configs/sft.yaml --config configs/sft-gpu.yaml --config configs/ablations/sft-gpu-attn.yaml & pids+=($!)
fit sft-gpu-mixed --config configs/sft.yaml --config configs/sft-gpu.yaml --config configs/ablations/sft-gpu-mixed.yaml & pids+=($!)
fit sft-gpu-nfcorpus --config configs/sft.yaml --config configs/sft-gpu.yaml --config configs/sft-gpu-nfcorpus.yaml & pids+=($!)
fit sft --config configs/sft.yaml & pids+=($!)
wait "${pids[@]}"
echo "fits: $(( $(stamp) - t0 )) s" | tee -a "$OUT_DIR/times.txt"

# The table takes every adapter that exists; a fit that failed drops its row rather than the table.
table=configs/sft-gpu-table.yaml
available=$("$PY" - "$table" "$OUT_DIR/sft-gpu-table.available.yaml" <<'PY'
import sys
from pathlib import Path
import yaml
src, dst = sys.argv[1], sys.argv[2]
cfg = yaml.safe_load(Path(src).read_text())
retrievers = cfg["model"]["init_args"]["retrievers"]
keep = [r for r in retrievers
        if not (a := r["init_args"]["encoder"]["init_args"].get("adapter")) or Path(a).is_dir()]
if len(keep) == len(retrievers):
    print(src)
else:
    for r in retrievers:
        if r not in keep:
            print(f"table: no adapter for {r['init_args']['name']}; its row is left out", file=sys.stderr)
    cfg["model"]["init_args"]["retrievers"] = keep
    Path(dst).write_text(yaml.safe_dump(cfg, sort_keys=False))
    print(dst)
PY
)
start=$(stamp)
# shellcheck disable=SC2046
"$PY" -m search_r3.cli test --config "$available" --model.init_args.record_results true \
  $(logger_args sft-gpu-table) "${TEST_EXTRA[@]}" 2>&1 | tee "$OUT_DIR/test-table.log"
echo "table: exit ${PIPESTATUS[0]}, $(( $(stamp) - start )) s" | tee -a "$OUT_DIR/times.txt"
echo "total: $(( $(stamp) - t0 )) s" | tee -a "$OUT_DIR/times.txt"
[ -n "${sampler:-}" ] && kill "$sampler" 2>/dev/null
exit 0
