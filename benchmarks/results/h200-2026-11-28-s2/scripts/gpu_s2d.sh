#!/usr/bin/env bash
# Session 2, last call (2 GPUs): MMLU end to end with length/padding-capped batches on GPU 0; then data parallel
# on 2 GPUs vs 1 GPU with the same global batch (grad-accum 2): per-chip tok/s and the loss curves.
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
nvidia-smi --query-gpu=name --format=csv,noheader
CUDA_VISIBLE_DEVICES=0 timeout 240 python benchmarks/mmlu_speed.py --mmlu .mmlu --naive-per-subject 2 2>&1 | grep -v Warn
COMMON="--init random --model llama2-7b --data synthetic --preset bf16 --max-steps 14 --warmup-steps 4 --no-mmlu --no-save-adapter --no-progress"
CUDA_VISIBLE_DEVICES=0 python -m lorabench run $COMMON --grad-accum 2 --run-dir /tmp/dp1 > /tmp/dp1.log 2>&1
torchrun --nproc_per_node 2 -m lorabench run $COMMON --run-dir /tmp/dp2 > /tmp/dp2.log 2>&1
for d in dp1 dp2; do
  python - $d <<'PY'
import json, sys
r = json.load(open(f"/tmp/{sys.argv[1]}/result.json"))
m, s = r["metrics"], r["series"]
print(sys.argv[1], "world", r["config"]["world_size"], "tok/s/chip", round(m["tokens_per_s_per_chip"]),
      "peak GiB", round(m["peak_mem_allocated_gib"], 1), "loss", [round(x, 4) for x in s["loss"]])
PY
  tail -3 /tmp/$d.log | grep -i error
  cp /tmp/$d/result.json ${OUT:-/tmp}/result_$d.json 2>/dev/null
done
