#!/usr/bin/env bash
# The prepared GPU benchmark for a lent GPU machine: every GPU section, each bounded by a timeout, results as JSON.
# A lent machine has about 15 minutes in all: the five sections are bounded to 3 + 3 + 3 + 1 + 1.5 minutes.
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
run extract 180 python benchmarks/bench_extract.py --quick --gpu --skip-memory --out "$out/extract.json"
# Stage two: the real train_one_epoch + evaluate at EPIC-100's size on the GPU (3.6 M rows, 67,217 / 9,668 segments,
# T=32, bf16): epoch s, validation s, peak memory, model-alone share.
run temporal 180 python benchmarks/bench_temporal.py --only-loop --loop-segments 0 --gpu
# finetune: its GPU section only (T=16 / T=32 clips/s, projected EPIC epoch, peak memory, decode wait).
run finetune 180 python benchmarks/bench_finetune.py --gpu --skip-cpu
for bench in predict; do  # the GPU sections of later stages, when their benchmarks exist
    if [ -f "benchmarks/bench_$bench.py" ]; then
        run "$bench" 90 python "benchmarks/bench_$bench.py" --gpu
    fi
done
