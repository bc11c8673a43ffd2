#!/usr/bin/env bash
# Wheels for a lent GPU machine that has no package index. Run here (PyPI reachable) before a GPU check:
#   bash benchmarks/gpu_prepare.sh                 -> .gpu_wheels/ (git-ignored)
# then run the check with carry [".gpu_wheels"], installing on the GPU machine with:
#   python3 -m pip install --no-index --no-deps .gpu_wheels/*.whl
#   python3 -m pip install --no-index --no-build-isolation --no-deps -e .
# That machine's Python 3.12 already has torch, torchvision, numpy, h5py, pandas, typer, rich, pyyaml, matplotlib,
# tensorboard, onnx*, pillow, scipy, psutil and pytest(-timeout); it lacks PyAV and zarr with zarr's own
# dependencies. dask/distributed are left out: epicfeat imports them only inside extract --scheduler, whose tests
# are deselected there (-k "not dask"). Versions are constraints.txt's pins; the carried tree must stay < 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
names="av zarr numcodecs donfig google-crc32c"
limit_mb=50

pins=()
for name in $names; do
    pin=$(grep -iE "^$name==" constraints.txt) || { echo "gpu_prepare: no '$name==' pin in constraints.txt" >&2; exit 2; }
    pins+=("$pin")
done
rm -rf .gpu_wheels
PIP_CONSTRAINT= python3 -m pip download --quiet --dest .gpu_wheels --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    "${pins[@]}"

ls -l .gpu_wheels
bytes=$(du -sb .gpu_wheels | cut -f1)
echo "gpu_prepare: .gpu_wheels holds $(ls .gpu_wheels | wc -l) wheels, $((bytes / 1000000)) MB"
if [ "$bytes" -gt $((limit_mb * 1000000)) ]; then
    echo "gpu_prepare: .gpu_wheels is over $limit_mb MB: the carried tree must stay under 64 MiB" >&2
    exit 1
fi
