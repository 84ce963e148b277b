#!/usr/bin/env bash
set -u
export PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=name --format=csv,noheader
python -c "
import sys; sys.argv=['x']; sys.path.insert(0,'benchmarks')
import documents_packing as D, json; print('check', json.dumps(D.check_gpu_path()))" 2>&1 | grep -v Warn | tail -3
mkdir -p $OUT/curves
for d in 0 0.05; do for p in bf16 fp8; do
  python -m lorabench run --init random --model llama2-7b --data synthetic --preset $p --lora-dropout $d \
    --max-steps 200 --lr 1e-4 --no-mmlu --no-save-adapter --no-progress --eval-batches 0 --no-tensorboard \
    --run-dir /tmp/c_${p}_$d > /tmp/c_${p}_$d.log 2>&1; echo "curve $p d$d rc=$?"
  cp /tmp/c_${p}_$d/result.json $OUT/curves/${p}_d$d.json 2>/dev/null || tail -3 /tmp/c_${p}_$d.log
done; done
python - <<'PY'
import json, os
o=os.environ["OUT"]
for d in ("0","0.05"):
    a=json.load(open(f"{o}/curves/bf16_d{d}.json"))["series"]["loss"]; b=json.load(open(f"{o}/curves/fp8_d{d}.json"))["series"]["loss"]
    gaps=[abs(y-x)/x for x,y in zip(a,b)]
    print(f"lr 1e-4 dropout {d}: final bf16 {a[-1]:.4f} fp8 {b[-1]:.4f} ({100*(b[-1]-a[-1])/a[-1]:+.3f}%); last10 {sum(a[-10:])/10:.4f} {sum(b[-10:])/10:.4f}; max gap after step 10 {100*max(gaps[10:]):.3f}% at step {11+gaps[10:].index(max(gaps[10:]))}")
PY
