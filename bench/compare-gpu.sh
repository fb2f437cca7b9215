#!/usr/bin/env bash
# MLSM vs MLM at GPU size (BERT-mini, 4000 steps x 128 sequences, K=3000, layers 2/4/6) on one GPU.
# Needs a CUDA build of torch in .venv (make setup TORCH_SPEC=...); results in results/compare-gpu.{md,json,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
make setup corpus eval-data
.venv/bin/python -m pip install -q -e ".[plot]"
.venv/bin/python bench/compare.py --size gpu "$@"
