#!/usr/bin/env bash
# Single-node fine-tuning entry point of the world model.
# Training (tiny local Qwen2 base on CPU, DeepSpeed on GPUs) is not built yet:
# this script says so and exits non-zero rather than pretending to train.
set -euo pipefail
echo "local_train.sh: not yet — world-model training is not implemented in this version." >&2
echo "Today: 'make demo' builds the cases that training will read (work/demo/mimic-iv/cases.jsonl)." >&2
exit 3
