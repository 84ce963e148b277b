#!/usr/bin/env bash
# Call 5: Inductor's multi-kernel reductions (torch.compile(options={"triton.multi_kernel": 1}) for the training
# blocks): with it Inductor also generates persistent reductions up to 16,384 columns (1,024 without: RMSNorm's
# 4,096 and SwiGLU's 11,008 run as looped reductions, the fp8 quantize's row amax computing its elementwise chain
# twice) and times both at the first call. B = a copy of src/ with that one change (abtmp/src, not committed).
set -u
export PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for p in fp8 bf16; do
  python benchmarks/ab.py --a src --b abtmp/src --preset $p --batch-size 16 --steps 12 --untimed-steps 4 --rounds 2 \
    --run-dir /tmp/ab_mk_$p 2>&1 | tail -4
  cp /tmp/ab_mk_$p/ab.json $OUT/ab_multikernel_$p.json 2>/dev/null
done
