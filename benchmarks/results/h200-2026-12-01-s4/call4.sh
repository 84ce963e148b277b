#!/usr/bin/env bash
# Calls 4-5 (DROPOUT=0, DROPOUT=0.05): the all-linear r16 row, native (stacked shared-input adapters) vs Unsloth, one round (carry .whl)
set -u
mkdir -p /tmp/site && tar xzf .whl/unsloth-site.tgz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -m lorabench bench --presets bf16 --engines native,unsloth --batch-size 16 --lora-r 16 --lora-alpha 32 \
  --lora-dropout ${DROPOUT:-0} --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --steps 10 \
  --untimed-steps 3 --no-floor --run-dir /tmp/alllin --overwrite 2>&1 | grep -v -i warn | grep -E "^\||native /|error|->"
cp /tmp/alllin/bench.json $OUT/bench_all_linear_d${DROPOUT:-0}.json; cp /tmp/alllin/bench.md $OUT/bench_all_linear_d${DROPOUT:-0}.md
