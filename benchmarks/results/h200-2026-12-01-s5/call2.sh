#!/usr/bin/env bash
# Call 2: offload against block on the device (after the recomputation's kernel-priority fix), the loss head's
# chunks compiled afresh per setting, and --activation-checkpointing adapter-inputs A/B on the all-linear r16 d0 row
set -u
export PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python benchmarks/gpu_check.py offload 2>&1 | grep -v -i warn | tail -12
python benchmarks/ce_chunks.py --vocabs 32000,128256 --rows 512,1024 2>&1 | grep -v -i warn
python benchmarks/ab.py --a src --b src --b-flags="--activation-checkpointing adapter-inputs" --preset bf16 \
  --batch-size 16 --rounds 2 --steps 12 --untimed-steps 4 --run-dir /tmp/ab -- \
  --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --lora-r 16 --lora-alpha 32 \
  --lora-dropout 0 2>&1 | grep -v -i warn | tail -8
cp /tmp/ab/ab.json $OUT/ab_adapter_inputs_all_linear_d0.json
