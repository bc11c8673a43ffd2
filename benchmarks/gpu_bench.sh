#!/usr/bin/env bash
# The prepared GPU benchmark for a lent GPU machine: every GPU section, each bounded by a timeout, results as JSON.
#   bash benchmarks/gpu_bench.sh [OUT_DIR]        (OUT_DIR defaults to $OUT, then bench_out/)
# Needs the package installed (pip install -e .) and a CUDA GPU. Sections that are not built yet are skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench_out}}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())" | tee -a "$out/gpu.txt"

run() {  # run NAME SECONDS COMMAND...: one section, its log and exit code kept even when it times out
    local name=$1 seconds=$2; shift 2
    echo "=== $name (limit ${seconds}s)"
    timeout "$seconds" "$@" > >(tee "$out/$name.log") 2>&1
    echo "$name exit code $?" | tee -a "$out/exit_codes.txt"
}

# Stage one: decode / model / end-to-end on the GPU (bf16, channels_last), memory section skipped for time.
run extract 290 python benchmarks/bench_extract.py --quick --gpu --skip-memory --out "$out/extract.json"
# Stage two: one full-size EPIC-100 epoch (67,217 segments) of the BiLSTM on the GPU.
run temporal 290 python benchmarks/bench_temporal.py --gpu --skip-cpu-model
for bench in finetune predict; do  # the GPU sections of later stages, when their benchmarks exist
    if [ -f "benchmarks/bench_$bench.py" ]; then
        run "$bench" 290 python "benchmarks/bench_$bench.py" --gpu
    fi
done
