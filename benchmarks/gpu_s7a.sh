#!/usr/bin/env bash
# For the next session's first call (~7 min on one H100/H200; written in the sixth session, not yet run): the
# floor with attention timed by its kernels' busy time (NOTES item 32) at tf32 LBS 2 and bf16 LBS 16 (the bf16
# one should match earlier sessions' within noise: its attention kernels are large); flagperf-tf32 native vs the
# reference in three rounds against that floor; the tf32 step's profile (Inductor's 14.5 ms, the gaps).
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 90 python benchmarks/floor.py --configs 2x512,16x512 --dtype tf32 2>&1 | grep -v -i warn
timeout 60 python benchmarks/floor.py --configs 16x512 --dtype bf16 2>&1 | grep -v -i warn
timeout 200 python -m lorabench bench --presets flagperf-tf32 --engines native,reference --steps 12 --warmup-steps 4 \
    --rounds 3 --run-dir /tmp/runs/tf32 2>&1 | grep -E "^(\||- )"
cp /tmp/runs/tf32/bench.json ${OUT:-/tmp}/tf32.json 2>/dev/null
timeout 120 python benchmarks/profile_step.py --compile --fuse --attention matmul --precision tf32 --batch-size 2 \
    --top 30 2>&1 | grep -v -i warn | head -50
