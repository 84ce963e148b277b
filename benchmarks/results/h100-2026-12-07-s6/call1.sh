set -u
O=${OUT:-/tmp/out}; mkdir -p $O
exec > >(tee -a $O/log.txt) 2>&1
T0=$(date +%s); TOTAL=585
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
at() { echo "== $1 at $(( $(date +%s)-T0 )) s"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton; print(torch.__version__, triton.__version__)"
export PYTHONPATH=src:benchmarks
at "gpu_check nf4 (kernels launched with contraction allowed: mul_rn)"
timeout 90 python benchmarks/gpu_check.py nf4 2>&1 | grep -v -i warn | tail -40
at "nf4_launch --step triton_op"
timeout 150 python benchmarks/nf4_launch.py --step triton_op 2>&1 | grep -v -i warn | tail -14
at "nf4_launch --step custom_op"
timeout 130 python benchmarks/nf4_launch.py --step custom_op 2>&1 | grep -v -i warn | tail -3
ck() {  # $1 tag, rest: args
  tag=$1; shift; rm -rf /tmp/ck_$tag
  TORCH_LOGS=recompiles,graph_breaks timeout 100 python .base/ckdebug.py run --init random --data synthetic --preset qlora --activation-checkpointing block --max-steps 2 --untimed-steps 1 --batch-size 2 --no-mmlu --no-save-adapter --no-progress --eval-batches 0 --run-dir /tmp/ck_$tag "$@" > $O/ck_$tag.log 2>&1
  echo "rc=$?"; grep -v -i warn $O/ck_$tag.log | tail -8 | cut -c1-400
  echo "recompiles: $(grep -c -i 'recompiling' $O/ck_$tag.log), graph breaks: $(grep -c -i 'graph break' $O/ck_$tag.log)"
  grep -i -m3 -A3 "recompiling\|graph break" $O/ck_$tag.log | cut -c1-300
}
at "qlora block ckpt tiny compiled (debug)"
ck tiny --model tiny
at "qlora block ckpt 7B compiled (debug)"
ck 7b --model llama2-7b
at "eval both, eager default"
rm -rf /tmp/ev
timeout $(( $(left) - 5 )) python -m lorabench eval --init random --model-dir .base/llama2 --mmlu .base/mmlu --precision fp16 --mmlu-protocol both --no-progress --run-dir /tmp/ev > $O/ev.log 2>&1
echo "rc=$?"; tail -4 $O/ev.log | cut -c1-300
cp /tmp/ev/*.json /tmp/ev/*.md $O/ 2>/dev/null
python - <<'PY'
import json, glob
for f in glob.glob("/tmp/ev/**/*.json", recursive=True):
    d = json.load(open(f))
    def walk(x, path=""):
        if isinstance(x, dict):
            for k, v in x.items():
                if k not in ("subjects", "categories"): walk(v, path + "." + k)
        elif any(w in path for w in ("_s", "acc")): print(f"  {f.split('/')[-1]}{path} = {x}")
    walk(d)
PY
at end
