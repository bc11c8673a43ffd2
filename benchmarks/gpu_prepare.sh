#!/usr/bin/env bash
# What a lent GPU machine (no package index, nothing beside the repo) needs for benchmarks/gpu_check.sh. Run here,
# where PyPI is reachable:   bash benchmarks/gpu_prepare.sh
#   .gpu_wheels/       the wheels its Python 3.12 lacks: PyAV, and zarr with zarr's own dependencies. It already has
#                      torch, torchvision, numpy, h5py, pandas, typer, rich, pyyaml, matplotlib, tensorboard, onnx*,
#                      pillow, scipy, psutil, pytest(-timeout). dask/distributed are left out: epicfeat imports them
#                      only inside extract --scheduler, whose tests are deselected there (-k "not dask").
#   .gpu_annotations/  a copy of ../shared/epic100-annotations (../shared does not travel).
# Both are git-ignored: carry them (run's carry [".gpu_wheels", ".gpu_annotations"]). Versions are constraints.txt's
# pins. The carried tree must stay under 64 MiB, so the script fails over 60 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
names="av zarr numcodecs donfig google-crc32c"
annotations=../shared/epic100-annotations
limit_mb=60

pins=()
for name in $names; do
    pin=$(grep -iE "^$name==" constraints.txt) || { echo "gpu_prepare: no '$name==' pin in constraints.txt" >&2; exit 2; }
    pins+=("$pin")
done
[ -f "$annotations/EPIC_100_validation.csv" ] || { echo "gpu_prepare: no EPIC-100 annotations at $annotations" >&2; exit 2; }

rm -rf .gpu_wheels .gpu_annotations
PIP_CONSTRAINT= python3 -m pip download --quiet --dest .gpu_wheels --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    "${pins[@]}"
mkdir .gpu_annotations
cp "$annotations"/* .gpu_annotations/
chmod -R u+w .gpu_annotations  # ../shared is read-only; the next run must be able to remove the copy

ls -l .gpu_wheels
bytes() { du -cb "$@" 2>/dev/null | tail -1 | cut -f1; }
mb() { awk "BEGIN {printf \"%.1f\", $1 / 1e6}"; }
wheels=$(bytes .gpu_wheels) notes=$(bytes .gpu_annotations)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
total=$((wheels + notes + tree))
echo "gpu_prepare: .gpu_wheels $(mb $wheels) MB ($(ls .gpu_wheels | wc -l) wheels) + .gpu_annotations $(mb $notes) MB" \
     "+ the tree $(mb $tree) MB = $(mb $total) MB to carry"
if [ "$total" -gt $((limit_mb * 1000000)) ]; then
    echo "gpu_prepare: $(mb $total) MB is over $limit_mb MB: the carried tree must stay under 64 MiB" >&2
    exit 1
fi
