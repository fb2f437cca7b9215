#!/usr/bin/env bash
# The GPU figures of `make bench-train` (issue 4 targets): run on a machine with a CUDA build of torch,
# from the repository root, after `make setup TORCH_SPEC=...` (and `make corpus`, or copy data/bench/ over).
#  1. BERT-medium student, batch 32 x 128, bf16: MLM vs MLSM vs MLSM+MLM vs online reference (target: online >= 2.5x MLSM).
#  2. BERT-base student, batch 256 x 128, bf16: the MLSM step's model FLOPs utilisation (target: MFU >= 40%).
set -euo pipefail
PY=${PY:-.venv/bin/python}
$PY bench/train_throughput.py --device cuda --model medium --batch-size 32 --precision bf16 --build-device cuda \
    --warmup 5 --iters 30 "$@"
$PY bench/train_throughput.py --device cuda --model base --batch-size 256 --precision bf16 --build-device cuda \
    --modes mlsm --warmup 5 --iters 20 "$@"
