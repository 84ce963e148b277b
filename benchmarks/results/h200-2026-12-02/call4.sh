#!/usr/bin/env bash
# Call 4: --fp8-skip down_proj on the card (7B seed LoRA, LBS 16): its speed against plain fp8 (ab.py, rounds
# alternating), the floor of such a row (bench times it with down_proj in bf16), and bf16 in the same call.
set -u
export PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python benchmarks/ab.py --a src --b src --preset fp8 --batch-size 16 --rounds 2 --run-dir /tmp/ab_skip \
  --b-flags="--fp8-skip down_proj" 2>&1 | tail -8
cp /tmp/ab_skip/*.json $OUT/ 2>/dev/null
python -m lorabench bench --presets fp8 --engines native --batch-size 16 --steps 10 --untimed-steps 3 \
  --fp8-skip down_proj --run-dir /tmp/bench_skip 2>&1 | tail -6
cp /tmp/bench_skip/bench.json $OUT/bench_fp8_skip_down.json
python -m lorabench bench --presets bf16 --engines native --batch-size 16 --steps 10 --untimed-steps 3 \
  --no-floor --run-dir /tmp/bench_bf16 2>&1 | tail -4
cp /tmp/bench_bf16/bench.json $OUT/bench_bf16.json
