#!/usr/bin/env bash
# Calls A and B of the fourth session of 2026-11-28 (results/h200-2026-11-28-s4/; one H200/H100, `bash gpu_next.sh
# 1` ~5 min, `... 2` ~4 min): what the third session built but could not measure (NOTES items 12-16).
# 1. MMLU end to end, cold, each in a fresh process with its own compile caches: eager blocks (no compiling: the
#    compile takes 13-16 s of a ~60 s run), compiled (with the scoring alone and the naive loop, same process),
#    compiled with the prefix attention that copies nothing (prefix_attention split). All with each subject's
#    batches queued before the previous subject's scores are read back (new). Then gpu_check (CUDA numerics,
#    now with both prefix attentions).
# 2. bf16 LBS 16: native plain, with CUDA graphs for the training blocks (launch gaps ~11 ms of a 404 ms step)
#    and with fused projections (gate/up now interleaved), against reference+compile, with the floor;
#    flagperf-tf32 (fused is its default: now interleaved too): native vs reference and reference+liger (the memory
#    bar: 32.3 GiB), with the floor that now also times the compiled matmul attention.
# Needs the MMLU folder at .mmlu and, for part 2, the liger wheel in .whl (see README).
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LORABENCH_CACHE=/tmp/lbcache
R=/tmp/runs; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader
part=${1:-1}
if [ "$part" = 1 ]; then
M="timeout 200 python benchmarks/mmlu_speed.py --mmlu .mmlu"
TORCHINDUCTOR_CACHE_DIR=/tmp/ind_1 TRITON_CACHE_DIR=/tmp/tri_1 $M --variants eager:256 --naive-per-subject 0 2>&1 \
    | grep -E "^(eager|compiled)"
TORCHINDUCTOR_CACHE_DIR=/tmp/ind_2 TRITON_CACHE_DIR=/tmp/tri_2 $M --variants compiled:256 --naive-per-subject 2 \
    2>&1 | grep -v -i warn
TORCHINDUCTOR_CACHE_DIR=/tmp/ind_3 TRITON_CACHE_DIR=/tmp/tri_3 $M --variants compiled:256::split \
    --naive-per-subject 0 2>&1 | grep -E "^(eager|compiled)"
timeout 100 python benchmarks/gpu_check.py 2>&1 | grep -v -i warn
fi
if [ "$part" = 2 ]; then
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=$PYTHONPATH:/tmp/site
python -m lorabench bench --presets bf16 --engines native,reference+compile --batch-size 16 --steps 10 \
    --warmup-steps 4 --run-dir $R/lbs16 2>&1 | grep -E "^(\||- floor)"
LORABENCH_COMPILE_MODE=reduce-overhead python -m lorabench bench --presets bf16 --engines native --batch-size 16 \
    --steps 10 --warmup-steps 4 --no-floor --run-dir $R/lbs16_graphs 2>&1 | grep -E "^\| native"
LORABENCH_FUSED_PROJECTIONS=1 python -m lorabench bench --presets bf16 --engines native --batch-size 16 \
    --steps 10 --warmup-steps 4 --no-floor --run-dir $R/lbs16_fused 2>&1 | grep -E "^\| native"
python -m lorabench bench --presets flagperf-tf32 --engines native,reference,reference+liger --steps 12 \
    --warmup-steps 4 --run-dir $R/tf32 2>&1 | grep -E "^(\||- floor)"
for d in lbs16 lbs16_graphs lbs16_fused tf32; do cp $R/$d/bench.json ${OUT:-/tmp}/bench_$d.json 2>/dev/null; done
fi
