#!/usr/bin/env bash
# Call 5: the fp8 seed row (LBS 16) with packed dropout masks, one run: that the FP8 engine's compiled blocks take
# them, and its peak memory (before: 32.3 GiB, 27,877-28,647 tok/s in calls 1-2 and item 67).
set -u
export PYTHONPATH=src
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -m lorabench run --init random --model llama2-7b --data synthetic --preset fp8 --engine native \
  --batch-size 16 --max-steps 12 --untimed-steps 4 --device cuda --run-dir /tmp/fp8 --no-mmlu --no-save-adapter \
  --no-progress --eval-batches 0 2>&1 | grep -v -i warn | tail -6
cp /tmp/fp8/result.json $OUT/call5_fp8_result.json
