#!/usr/bin/env bash
# Session 3, fourth call (one H200): MMLU end to end cold with the eval graph compiling in a background thread
# while the first subjects are scored eagerly; then scoring alone and the naive one-question loop, same run.
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 230 python benchmarks/mmlu_speed.py --mmlu .mmlu --variants compiled:256 --naive-per-subject 2 2>&1 \
    | grep -v -i warn
