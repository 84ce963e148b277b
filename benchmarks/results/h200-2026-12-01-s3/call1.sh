#!/usr/bin/env bash
# one device call: FP8 curves at a stable lr, documents packing check + speed
set -u
export PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch;print(torch.__version__)"
mkdir -p $OUT/curves
for d in 0 0.05; do for p in bf16 fp8; do
  python -m lorabench run --init random --model llama2-7b --data synthetic --preset $p --lora-dropout $d \
    --max-steps 200 --lr 3e-4 --no-mmlu --no-save-adapter --no-progress --eval-batches 0 --no-tensorboard \
    --run-dir /tmp/c_${p}_$d > /tmp/c_${p}_$d.log 2>&1; echo "curve $p d$d rc=$?"
  cp /tmp/c_${p}_$d/result.json $OUT/curves/${p}_d$d.json 2>/dev/null || tail -3 /tmp/c_${p}_$d.log
done; done
python - <<'PY'
import json, os
o=os.environ["OUT"]
for d in ("0","0.05"):
    try:
        a=json.load(open(f"{o}/curves/bf16_d{d}.json"))["series"]["loss"]; b=json.load(open(f"{o}/curves/fp8_d{d}.json"))["series"]["loss"]
    except Exception as e:
        print("curves", d, e); continue
    gaps=[abs(y-x)/x for x,y in zip(a,b)]
    print(f"dropout {d}: final bf16 {a[-1]:.4f} fp8 {b[-1]:.4f} ({100*(b[-1]-a[-1])/a[-1]:+.3f}%); max gap after step 10 {100*max(gaps[10:]):.3f}% at step {11+gaps[10:].index(max(gaps[10:]))}; first {a[0]:.4f}")
PY
timeout 330 python benchmarks/documents_packing.py --rounds 2 --steps 12 --out /tmp/docs 2>&1 | grep -v Warning | tail -8
cp /tmp/docs/documents_packing.json $OUT/ 2>/dev/null
