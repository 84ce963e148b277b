#!/usr/bin/env bash
# Call 3: where the fp8 step's time goes (against bf16, same shape: 7B, seed LoRA, LBS 16, compiled, cuDNN
# attention); the Qwen2.5-7B seed row against Unsloth, two rounds, with the loss head's 1024-row chunks (carry .whl)
set -u
mkdir -p /tmp/site && tar xzf .whl/unsloth-site.tgz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for p in fp8 bf16; do
  python benchmarks/profile_step.py --precision $p --batch-size 16 --compile --attention cudnn --top 30 \
    --gemm-shapes 2>&1 | grep -v -i warn > $OUT/profile_$p.txt; head -4 $OUT/profile_$p.txt
done
python -m lorabench bench --model qwen2.5-7b --presets bf16 --engines native,unsloth --batch-size 8 --seq-len 1024 \
  --steps 10 --untimed-steps 3 --rounds 2 --no-floor --run-dir /tmp/qw --overwrite 2>&1 | grep -v -i warn | \
  grep -E "^\||native /|rror|->"
cp /tmp/qw/bench.json $OUT/bench_qwen2.5_7b_unsloth.json; cp /tmp/qw/bench.md $OUT/bench_qwen2.5_7b_unsloth.md
