#!/usr/bin/env bash
# Fourth session, last call (~3 min on one H200): full MMLU cold with the new defaults (split prefix attention),
# in a fresh process and compile cache; where the flagperf-tf32 step's GPU time goes (native, its default path).
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
nvidia-smi --query-gpu=name --format=csv,noheader
TORCHINDUCTOR_CACHE_DIR=/tmp/ind_e TRITON_CACHE_DIR=/tmp/tri_e timeout 200 python benchmarks/mmlu_speed.py \
    --mmlu .mmlu --variants compiled:256 --naive-per-subject 0 2>&1 | grep -E "^(eager|compiled|MMLU)"
timeout 150 python benchmarks/profile_step.py --compile --fuse --attention matmul --precision tf32 --batch-size 2 \
    --steps 5 --top 22 2>&1 | grep -v -i warn
