#!/usr/bin/env bash
# Call 6: the per-step criterion's control: bf16 against bf16 with fused q/k/v and gate/up GEMMs (the same
# maths, other rounding), the settings of call 1's curves
set -u
export PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
mkdir -p $OUT/curves
for f in no-fused-projections fused-projections; do
  python -m lorabench run --init random --model llama2-7b --data synthetic --preset bf16 --lora-dropout 0 \
    --max-steps 200 --lr 1e-4 --lr-warmup-steps 10 --max-grad-norm 1.0 --no-mmlu --no-save-adapter --no-progress \
    --eval-batches 0 --no-tensorboard --$f --run-dir /tmp/c_$f > /tmp/c_$f.log 2>&1; echo "curve $f rc=$?"
  cp /tmp/c_$f/result.json $OUT/curves/bf16_d0_clip1_$f.json 2>/dev/null || tail -3 /tmp/c_$f.log
done
python - <<'PY'
import json, os
o=os.environ["OUT"]
la=json.load(open(f"{o}/curves/bf16_d0_clip1_no-fused-projections.json"))["series"]["loss"]
lb=json.load(open(f"{o}/curves/bf16_d0_clip1_fused-projections.json"))["series"]["loss"]
gaps=[abs(y-x)/x for x,y in zip(la,lb)]
print(f"bf16 vs bf16 fused: final {la[-1]:.4f} {lb[-1]:.4f}; max gap after step 10 {100*max(gaps[10:]):.3f}% at step "
      f"{11+gaps[10:].index(max(gaps[10:]))}; steps >1%: {sum(g>0.01 for g in gaps[10:])}/{len(gaps)-10}; "
      f"first step differing: {next((i for i,g in enumerate(gaps) if g>0), None)}")
PY
