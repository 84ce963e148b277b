#!/usr/bin/env bash
# Call 2: Inductor's persistent reductions forced (triton.multi_kernel 2: the persistent sub-kernel, no timing of
# both and no cache of the pick) for the training blocks. A: 3379aa2's src (ab_before/src), B: the same with
# torch.compile(layer, options={"triton.multi_kernel": 2}) in compile_blocks (ab_mk/src).
set -u
export PYTHONPATH=src
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for preset in fp8 bf16; do
  python benchmarks/ab.py --a ab_before/src --b ab_mk/src --preset $preset --batch-size 16 --rounds 2 \
    --run-dir /tmp/ab_$preset 2>&1 | tee $OUT/ab_$preset.txt | tail -8; cp /tmp/ab_$preset/ab.json $OUT/ab_$preset.json
done
