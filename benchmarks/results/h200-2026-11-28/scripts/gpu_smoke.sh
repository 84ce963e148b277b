#!/usr/bin/env bash
# First call on a GPU machine: environment, the tiny default on CUDA, a bf16 7B side-by-side, a profile.
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
python -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
python -m lorabench run --device cuda --no-progress --run-dir $OUT/tiny 2>&1 | head -14
python benchmarks/profile_step.py --engine native 2>&1 | tail -28
python -m lorabench bench --presets bf16 --engines native,reference,reference+liger,reference+compile \
    --steps 12 --warmup-steps 4 --run-dir $OUT/bench 2>&1 | tail -12
