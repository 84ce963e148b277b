#!/usr/bin/env bash
# Session 3, second call (one H200): MMLU end to end cold (compiling included) and warm, with the time split into
# scoring / first subject / waiting for tokenised subjects, then a profiled warm run (GPU busy vs wall); tf32 with
# fused projections now the default, against reference and reference+liger (the memory bar), and the floor;
# bf16 seq 4096 LBS 2 against reference+liger, and the floor.
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
R=/tmp/runs; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 260 python benchmarks/mmlu_speed.py --mmlu .mmlu --variants compiled:256,compiled:256 --naive-per-subject 0 \
    --profile 2>&1 | grep -v -i warn
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=$PYTHONPATH:/tmp/site
python -m lorabench bench --presets flagperf-tf32 --engines native,reference,reference+liger --steps 12 \
    --warmup-steps 4 --run-dir $R/tf32 2>&1 | grep -E "^(\||- floor)"
python -m lorabench bench --presets bf16 --engines native,reference+liger --batch-size 2 --seq-len 4096 --steps 8 \
    --warmup-steps 3 --run-dir $R/seq4096 2>&1 | grep -E "^(\||- floor)"
for d in tf32 seq4096; do cp $R/$d/bench.json ${OUT:-/tmp}/bench_$d.json 2>/dev/null; done
