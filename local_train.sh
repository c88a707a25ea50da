#!/usr/bin/env bash
# Single-node fine-tuning of the DiagGym world model.
#
#   ./local_train.sh                 CPU: bundled demo cases -> tiny local Qwen2 base -> train (configs/train/quick.json,
#                                    a few minutes on 2 cores; results parse with top-p 0.95)
#   ./local_train.sh --config local  the evaluated demo model (12 epochs, ~20 min on 2 cores; well formed at T = 1)
#   ./local_train.sh --gpus 8 --config reference --base /models/Qwen2.5-7B-Instruct --cases CASES_DIR
#                                    the reference run (DeepSpeed ZeRO-2, bf16) through torchrun, same script
#
# Options: --gpus N (0 = CPU), --config NAME|FILE (configs/train/), --cases DIR, --base DIR,
# --preset tiny|local|small (local base built when --base is not given), --out DIR (default work/runs/NAME-TIME).
# Anything else is passed to `diaggym train` (e.g. --max-steps 50, --resume, --no-mlflow).
set -euo pipefail
cd "$(dirname "$0")"

GPUS=0 CONFIG=quick CASES="" BASE="" PRESET=tiny OUT=""
PASS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --gpus) GPUS="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --cases) CASES="$2"; shift 2 ;;
    --base) BASE="$2"; shift 2 ;;
    --preset) PRESET="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) PASS+=("$1"); shift ;;
  esac
done

[[ -x .venv/bin/diaggym ]] || make install
BIN=.venv/bin

if [[ -z "$CASES" ]]; then
  CASES=work/demo/mimic-iv
  [[ -f $CASES/cases.jsonl ]] || $BIN/diaggym preprocess --source mimic-iv --input data/mimic-iv-demo --out "$CASES"
fi
if [[ -z "$BASE" ]]; then
  BASE=work/base-$PRESET
  [[ -f $BASE/config.json ]] || $BIN/diaggym base init --cases "$CASES" --out "$BASE" --preset "$PRESET"
fi
OUT=${OUT:-work/runs/$(basename "$CONFIG" .json)-$(date +%Y%m%d-%H%M%S)}

ARGS=(train --config "$CONFIG" --cases "$CASES" --base "$BASE" --out "$OUT" "${PASS[@]}")
if [[ "$GPUS" -gt 0 ]]; then
  # One process per GPU; the HF Trainer picks up the ranks and the DeepSpeed config from the run config.
  $BIN/torchrun --standalone --nproc_per_node "$GPUS" -m diaggym.cli "${ARGS[@]}"
else
  $BIN/diaggym "${ARGS[@]}"
fi
echo "model: $OUT/final"
