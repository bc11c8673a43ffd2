#!/usr/bin/env bash
# The GPU check: what a lent GPU machine runs, as that machine is (Python 3.12 with its own torch, no package index,
# about 15 minutes of device time in all, start-up included). Prepare on a CPU machine with PyPI, then run:
#   bash benchmarks/gpu_prepare.sh                  # once: the wheels it lacks -> .gpu_wheels/, annotations -> .gpu_annotations/
#   bash benchmarks/gpu_check.sh OUT                # there (carry .gpu_wheels and .gpu_annotations): about 7 minutes
#   bash benchmarks/gpu_check.sh OUT --device cpu   # the rehearsal on a CPU: every step, small sizes
# Every step is bounded by its own limit and independent of the others (a failure or a timeout never stops the next).
# OUT receives three files: gpu_check.log (all output), gpu_check.json (each step's exit code, seconds and numbers)
# and gpu_check.md (the tables for the README).
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:?usage: bash benchmarks/gpu_check.sh OUT [--device cpu]}")
device=cuda scale=1
if [ "${2:-}" = "--device" ]; then device=${3:?--device needs a value}; fi
[ "$device" = cpu ] && scale=4  # a rehearsal on a 2-core CPU: the same steps at small sizes, more time each
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
log="$out/gpu_check.log"
: > "$log"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

step() {  # step NAME SECONDS COMMAND...: one bounded step; its output goes to the log, its status to steps.tsv
    local name=$1 limit=$(($2 * scale)) started=$SECONDS code; shift 2
    echo "=== $name (limit ${limit} s): $*" | tee -a "$log"
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    code=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$code" "$((SECONDS - started))" "$limit" >> "$work/steps.tsv"
    echo "=== $name: exit code $code after $((SECONDS - started)) s" | tee -a "$log"
}

# The machine has no index: the wheels it lacks travel in .gpu_wheels, and the package installs without build
# isolation (setuptools is there) and without resolving dependencies (its torch stays).
step install 30 bash -c 'python3 -m pip install --no-index --no-deps .gpu_wheels/*.whl \
    && python3 -m pip install --no-index --no-build-isolation --no-deps -e .'
step environment 25 bash -c 'set -x; command -v python3 python; python3 -V; nproc; free -g; df -h /dev/shm "$0"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, torchvision, numpy, av, zarr, timm; print(\"torch\", torch.__version__, \"cuda\",
torch.version.cuda, \"cudnn\", torch.backends.cudnn.version(), \"gpu\", torch.cuda.is_available() and
torch.cuda.get_device_name(0)); print(\"torchvision\", torchvision.__version__, \"numpy\", numpy.__version__, \"av\",
av.__version__, \"zarr\", zarr.__version__, \"timm\", timm.__version__)"; command -v epicfeat' "$work"

# The CUDA tests (pytest -m cuda); on a CPU rehearsal they run their CUDA paths on the CPU.
test_device=$([ "$device" = cpu ] && echo cpu || echo cuda)
step cuda_tests 110 env EPICFEAT_TEST_CUDA_DEVICE="$test_device" \
    python3 -m pytest -q -m cuda -p no:cacheprovider tests
# Stage two at EPIC-100's size: epoch and validation seconds, peak memory, the model's share; then each head's
# epoch side by side on 5,000 segments.
step temporal 75 python3 benchmarks/bench_temporal.py --only-loop --loop-segments 0 --loop-repeats 2 --gpu \
    --gpu-device "$device" --annotations .gpu_annotations --out "$work/temporal.json" \
    --heads lstm,transformer,attentive,mean --heads-segments $([ "$device" = cpu ] && echo 20 || echo 5000)
# Stage one: ResNet50 variants, decode workers alone and end to end at 1080p and 640x360, GPU-busy share.
step extract 100 python3 benchmarks/bench_extract.py --quick --gpu --gpu-device "$device" --skip-memory \
    --skip-compile --workdir "$work/extract" --out "$work/extract.json"
# finetune: T=16 / T=32 clips/s, peak memory, share of time waiting on decoding.
step finetune 70 python3 benchmarks/bench_finetune.py --gpu --gpu-device "$device" --skip-cpu \
    --workdir "$work/finetune" --out "$work/finetune.json"
# predict: frames/s from a camera (FFmpeg's lavfi at 30 fps) and from a file, beside the backbone alone.
step predict 40 python3 benchmarks/bench_predict.py --device "$device" --frames 16 --seconds 3 --out "$work/predict.json"

python3 benchmarks/gpu_report.py "$work" "$out" "$device" 2>&1 | tee -a "$log"
