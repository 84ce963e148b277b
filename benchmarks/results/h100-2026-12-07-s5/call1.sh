set -u
O=${OUT:-/tmp/out}; mkdir -p $O
exec > >(tee -a $O/log.txt) 2>&1
T0=$(date +%s); TOTAL=590
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
at() { echo "== $1 at $(( $(date +%s)-T0 )) s"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton; print(torch.__version__, triton.__version__)"
evalrun() {  # $1 = src dir, $2 = tag
  rm -rf /tmp/ev_$2
  PYTHONPATH=$1 timeout $3 python -m lorabench eval --init random --model-dir .base/llama2 --mmlu .base/mmlu --precision fp16 --mmlu-protocol both --no-progress --run-dir /tmp/ev_$2 > /tmp/ev_$2.log 2>&1
  echo "rc=$?"; tail -3 /tmp/ev_$2.log | cut -c1-300
  python - $2 <<'PY'
import json, sys, glob
tag = sys.argv[1]
for f in sorted(glob.glob(f"/tmp/ev_{tag}/**/*.json", recursive=True)):
    if f.endswith(("eval.json", "result.json")):
        d = json.load(open(f))
        def walk(x, path=""):
            if isinstance(x, dict):
                for k, v in x.items():
                    if k in ("subjects", "categories"): continue
                    walk(v, path + "." + k)
            elif any(w in path for w in ("_s", "acc", "timing")):
                print(f"  {f.split('/')[-1]}{path} = {x}")
        walk(d)
PY
  mkdir -p $O/ev_$2; cp /tmp/ev_$2/*.json /tmp/ev_$2/*.md $O/ev_$2/ 2>/dev/null; cp /tmp/ev_$2.log $O/ev_$2/ 2>/dev/null
}
export PYTHONPATH=src:benchmarks
at "eval both, this tree (background compile, FlagPerf compiled)"
evalrun src new 240
at "profile nf4 triton LBS16"
PYTHONPATH=src:benchmarks timeout 140 python benchmarks/profile_step.py --engine native --compile --precision nf4 --nf4-dequant triton --batch-size 16 --steps 3 --top 30 2>&1 | grep -v -i warn
at "eval both, HEAD tree"
evalrun .base/src_head/src head $(( $(left) - 95 ))
at "7B qlora block checkpointing"
rm -rf /tmp/ck
PYTHONPATH=src timeout $(( $(left) - 5 )) python -m lorabench run --init random --model llama2-7b --data synthetic --preset qlora --activation-checkpointing block --max-steps 2 --untimed-steps 1 --batch-size 2 --no-mmlu --no-save-adapter --no-progress --eval-batches 0 --run-dir /tmp/ck > /tmp/ck.log 2>&1
echo "rc=$?"
grep -v -i "warn" /tmp/ck.log | grep -i -B2 -A12 "CheckpointError\|position\|metadata" | head -40
tail -3 /tmp/ck.log | cut -c1-600
cp /tmp/ck.log $O/ckpt_7b.log
at end
