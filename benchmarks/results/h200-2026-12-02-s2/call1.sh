#!/usr/bin/env bash
# Call 1: the fused FP8 SwiGLU kernels checked and timed, then the fp8 seed row A/B (ab_before/src: the tree
# before them, `git archive 3379aa2 src`).
set -u
export PYTHONPATH=src
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python benchmarks/gpu_check.py fp8_mlp compiled_engine 2>&1 | tee $OUT/gpu_check.txt | tail -45
python benchmarks/fp8_mlp_kernels.py 2>&1 | tee $OUT/kernels.txt | tail -12
python benchmarks/ab.py --a ab_before/src --b src --preset fp8 --batch-size 16 --rounds 2 --run-dir /tmp/ab \
  2>&1 | tee $OUT/ab.txt | tail -14; cp /tmp/ab/ab.json $OUT/
