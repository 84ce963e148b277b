#!/usr/bin/env bash
# Call 1: stacked adapters (shared input, dropout 0) A/B on the all-linear r16 row; FP8 vs bf16 curves with
# gradient clipping and lr warm-up (carry .base: the tree before the change)
set -u
export PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__)"
python benchmarks/ab.py --a .base/before/src --b src --preset bf16 --batch-size 16 --rounds 2 --steps 12 \
  --untimed-steps 4 --run-dir /tmp/ab -- --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
  --lora-r 16 --lora-alpha 32 --lora-dropout 0 2>&1 | grep -v Warn | tail -12
mkdir -p $OUT/curves
for p in bf16 fp8; do
  python -m lorabench run --init random --model llama2-7b --data synthetic --preset $p --lora-dropout 0 \
    --max-steps 200 --lr 1e-4 --lr-warmup-steps 10 --max-grad-norm 1.0 --no-mmlu --no-save-adapter --no-progress \
    --eval-batches 0 --no-tensorboard --run-dir /tmp/c_$p > /tmp/c_$p.log 2>&1; echo "curve $p rc=$?"
  cp /tmp/c_$p/result.json $OUT/curves/${p}_d0_clip1.json 2>/dev/null || tail -3 /tmp/c_$p.log
done
python - <<'PY'
import json, os
o=os.environ["OUT"]
a=json.load(open(f"{o}/curves/bf16_d0_clip1.json"))["series"]; b=json.load(open(f"{o}/curves/fp8_d0_clip1.json"))["series"]
la, lb = a["loss"], b["loss"]
gaps=[abs(y-x)/x for x,y in zip(la,lb)]
print(f"clip 1.0, warm-up 10, lr 1e-4, d0: final {la[-1]:.4f} {lb[-1]:.4f} ({100*(lb[-1]-la[-1])/la[-1]:+.3f}%); "
      f"max gap after step 10 {100*max(gaps[10:]):.3f}% at step {11+gaps[10:].index(max(gaps[10:]))}; "
      f"steps >1%: {sum(g>0.01 for g in gaps[10:])}/{len(gaps)-10}")
gn=a.get("grad_norm") or []
if gn: print("bf16 grad norm: min %.3f median %.3f max %.3f" % (min(gn), sorted(gn)[len(gn)//2], max(gn)))
PY
