#!/usr/bin/env bash
# Call 3: Llama-3-8B shape against Unsloth with the loss head in 1024-row chunks: the families issue's seed row
# (two rounds) and its all-linear r16 row (dropout 0, so native's default is adapter-inputs; one round) (carry .whl)
set -u
mkdir -p /tmp/site && tar xzf .whl/unsloth-site.tgz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -m lorabench bench --model llama3-8b --presets bf16 --engines native,unsloth --batch-size 8 --seq-len 1024 \
  --steps 10 --untimed-steps 3 --rounds 2 --no-floor --run-dir /tmp/l3 --overwrite 2>&1 | grep -v -i warn | \
  grep -E "^\||native /|rror|->"
cp /tmp/l3/bench.json $OUT/bench_llama3_8b_unsloth.json; cp /tmp/l3/bench.md $OUT/bench_llama3_8b_unsloth.md
python -m lorabench bench --model llama3-8b --presets bf16 --engines native,unsloth --batch-size 8 --seq-len 1024 \
  --lora-r 16 --lora-alpha 32 --lora-dropout 0 --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
  --steps 10 --untimed-steps 3 --no-floor --run-dir /tmp/l3a --overwrite 2>&1 | grep -v -i warn | \
  grep -E "^\||native /|rror|->"
cp /tmp/l3a/bench.json $OUT/bench_llama3_8b_all_linear_d0.json; cp /tmp/l3a/bench.md $OUT/bench_llama3_8b_all_linear_d0.md
