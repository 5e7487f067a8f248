#!/usr/bin/env bash
# Is a resumed run the uninterrupted one, on the real model and the real config? From a training
# checkpoint, train 3 more steps straight (a checkpoint after each), then resume a second run from the
# checkpoint after the first of them and train it to the same end; the two final checkpoints' trainable
# weights (and, in Stage 2, the environment's vectors) must be equal bit for bit. The tiny-model tests
# prove the mechanism; this shows it holds where the recipes run (dtype, threads, model, data).
#
#   bash scripts/resume_check.sh <checkpoint> <config> [<config> ...]
#   bash scripts/resume_check.sh runs/rl-min-reasoning/checkpoints/last.ckpt configs/rl.yaml configs/rl-claim.yaml configs/ablations/rl-min-reasoning.yaml
#
# Both runs use max_steps = the checkpoint's step + 3 (so the LR schedule differs from the original
# run's, the same in both), no validation and no fidelity probe, and log to a scratch MLflow database;
# nothing under runs/ or mlflow.db is touched. Prints one JSON line; exits 1 when the runs differ.
set -euo pipefail
[[ $# -ge 2 ]] || { sed -n '2,13p' "$0"; exit 2; }
ckpt=$1; shift
python=${PYTHON:-.venv/bin/python}
work=$(mktemp -d "${TMPDIR:-/tmp}/resume_check.XXXXXX")
configs=(); for c in "$@"; do configs+=(--config "$c"); done
step=$("$python" -c "import sys, torch; print(torch.load(sys.argv[1], map_location='cpu', weights_only=False, mmap=True)['global_step'])" "$ckpt")
end=$((step + 3))

run() {  # run <name> <checkpoint to resume from>
  "$python" -m search_r3.cli fit "${configs[@]}" --ckpt_path "$2" \
    --trainer.max_steps "$end" --trainer.limit_val_batches 0 \
    --trainer.logger '{"class_path": "lightning.pytorch.loggers.MLFlowLogger", "init_args": {"experiment_name": "resume-check", "run_name": "'"$1"'", "tracking_uri": "sqlite:///'"$work"'/mlflow.db"}}' \
    --trainer.callbacks '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": "'"$work/$1"'", "filename": "{step}", "save_top_k": -1, "every_n_train_steps": 1}}]' \
    --model.init_args.probe_every 1000000 --model.init_args.adapter_dir "$work/$1/adapter" > "$work/$1.log" 2>&1 \
    || { echo "the $1 run failed: see $work/$1.log" >&2; exit 1; }
}
run straight "$ckpt"
run resumed "$work/straight/step=$((step + 1)).ckpt"

"$python" - "$work/straight/step=$end.ckpt" "$work/resumed/step=$end.ckpt" "$ckpt" "$work" <<'EOF'
import json, sys
import torch
a, b = (torch.load(p, map_location="cpu", weights_only=False) for p in sys.argv[1:3])
weights = all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
env = None
if "environment" in a:
    env = torch.equal(a["environment"]["vectors"], b["environment"]["vectors"])
same = weights and env is not False and a["global_step"] == b["global_step"]
print(json.dumps({"checkpoint": sys.argv[3], "step": a["global_step"], "resumed_from_step": a["global_step"] - 2,
                  "weights_equal": weights, "environment_equal": env, "same": same, "work_dir": sys.argv[4]}))
sys.exit(0 if same else 1)
EOF
