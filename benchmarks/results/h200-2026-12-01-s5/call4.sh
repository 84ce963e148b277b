#!/usr/bin/env bash
# Call 4: the Llama-3-8B all-linear r16 d0 row against Unsloth (call 3's Unsloth row was refused: bench handed it
# native's adapter-inputs default, fixed since), then Llama-3.1-8B at 16k, LBS 1: both stacks offloading the
# blocks' inputs, and native block beside them (carry .whl)
set -u
mkdir -p /tmp/site && tar xzf .whl/unsloth-site.tgz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -m lorabench bench --model llama3-8b --presets bf16 --engines native,unsloth --batch-size 8 --seq-len 1024 \
  --lora-r 16 --lora-alpha 32 --lora-dropout 0 --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
  --steps 10 --untimed-steps 3 --no-floor --run-dir /tmp/l3a --overwrite 2>&1 | grep -v -i warn | \
  grep -E "^\||native /|rror|->"
cp /tmp/l3a/bench.json $OUT/bench_llama3_8b_all_linear_d0.json; cp /tmp/l3a/bench.md $OUT/bench_llama3_8b_all_linear_d0.md
for policy in offload block; do
  engines=native,unsloth; [ $policy = block ] && engines=native
  python -m lorabench bench --model llama3.1-8b --presets bf16 --engines $engines --batch-size 1 --seq-len 16384 \
    --activation-checkpointing $policy --steps 4 --untimed-steps 2 --no-floor --run-dir /tmp/long_$policy \
    --overwrite 2>&1 | grep -v -i warn | grep -E "^\||native /|rror|->"
  cp /tmp/long_$policy/bench.json $OUT/bench_long16k_$policy.json
done
