#!/usr/bin/env bash
# Session 3, third call (one H200): MMLU end to end cold (one evaluation graph, prefixes eager, chunked
# tokenising), then scoring alone and the naive loop in the same run; tf32 (matmul attention that recomputes its
# probabilities, fused projections) against reference and reference+liger (speed and the memory bar) with the
# floor (fused and separate q/k/v, gate/up timed); the CUDA numerics check; bf16 LBS 16 against
# reference+compile with the floor.
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
R=/tmp/runs; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python benchmarks/mmlu_speed.py --mmlu .mmlu --variants compiled:256 --naive-per-subject 2 2>&1 \
    | grep -v -i warn
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=$PYTHONPATH:/tmp/site
python -m lorabench bench --presets flagperf-tf32 --engines native,reference,reference+liger --steps 12 \
    --warmup-steps 4 --run-dir $R/tf32 2>&1 | grep -E "^(\||- floor)"
timeout 100 python benchmarks/gpu_check.py 2>&1 | grep -v -i warn
python -m lorabench bench --presets bf16 --engines native,reference+compile --batch-size 16 --steps 10 \
    --warmup-steps 4 --run-dir $R/lbs16 2>&1 | grep -E "^(\||- floor)"
for d in tf32 lbs16; do cp $R/$d/bench.json ${OUT:-/tmp}/bench_$d.json 2>/dev/null; done
