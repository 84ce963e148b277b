#!/usr/bin/env bash
# Session 3, fourth call (one H200): MMLU end to end, cold twice (separate compile caches): as is, and with the
# tokenising workers' tokenizer single-threaded (TOKENIZERS_PARALLELISM=false), so 4 workers use 4 cores and the
# compile of the eval graph (the first subject: 16 s) is not competing with them for the host's 16 cores.
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
TORCHINDUCTOR_CACHE_DIR=/tmp/ind_a TRITON_CACHE_DIR=/tmp/tri_a timeout 85 python benchmarks/mmlu_speed.py \
    --mmlu .mmlu --variants compiled:256 --naive-per-subject 0 2>&1 | grep -E "^compiled"
TOKENIZERS_PARALLELISM=false TORCHINDUCTOR_CACHE_DIR=/tmp/ind_b TRITON_CACHE_DIR=/tmp/tri_b timeout 85 \
    python benchmarks/mmlu_speed.py --mmlu .mmlu --variants compiled:256 --naive-per-subject 0 2>&1 | grep -E "^compiled"
