#!/usr/bin/env bash
# Call 4: dropout masks packed one bit an element. gpu_check dropout_masks (the packed kernel against its reference,
# bit for bit), then A (ab_before/src: `git archive 84c0299 src`) against B (src) on the seed bf16 row (q/v, d0.05, LBS 16,
# two rounds) and on all seven projections r16 d0.05 (one round).
set -u
export PYTHONPATH=src
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python benchmarks/gpu_check.py dropout_masks 2>&1 | tee $OUT/gpu_check_dropout.txt | tail -16
python benchmarks/ab.py --a ab_before/src --b src --preset bf16 --batch-size 16 --rounds 2 --run-dir /tmp/ab_seed \
  2>&1 | tee $OUT/ab_seed.txt | tail -7; cp /tmp/ab_seed/ab.json $OUT/ab_seed.json
python benchmarks/ab.py --a ab_before/src --b src --preset bf16 --batch-size 16 --rounds 1 --run-dir /tmp/ab_all \
  -- --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --lora-r 16 --lora-alpha 32 \
  2>&1 | tee $OUT/ab_all.txt | tail -5; cp /tmp/ab_all/ab.json $OUT/ab_all.json
