#!/usr/bin/env bash
# The temporal heads side by side on one feature set: train-temporal --head lstm | transformer | attentive | mean
# (and a 1-frame baseline), each best.pt evaluated on validation, one table (top-1, tail, unseen, head, T, context,
# epoch seconds, parameters) in OUT/compare/comparison.md with comparison.json (every metric, top-5 too) and
# comparison.png (top-1 beside epoch seconds). Every run resumes.
#
#   bash pipelines/compare_heads.sh ANNOTATIONS_DIR CACHE_DIR [OUT_DIR]     # features already extracted
#   bash pipelines/compare_heads.sh --synthetic [OUT_DIR]                   # the demo's data, CPU, minutes
#
# Settings: HEADS (default "lstm transformer attentive mean"), TEMPORAL_ARGS (flags for every run, e.g.
# "--frames 32 --context-seconds 2"), and per head HEAD_ARGS_<head> (e.g. HEAD_ARGS_transformer="--lr 3e-4").
# --synthetic: the demo's 18 videos (SPEC=tiny: its 6 short ones), random backbone, the demo's small recipe. Verbs
# there differ only by the order of frames: an honest check of what a head can see, not a forecast for EPIC.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--synthetic" ]; then
    out=${2:-runs/compare_heads_synthetic}
    spec=${SPEC:-default}
    [ "$spec" = tiny ] || [ "$spec" = default ] || { echo "SPEC must be tiny or default, got $spec" >&2; exit 2; }
    mkdir -p "$out"
    [ -f "$out/data/annotations/EPIC_100_train.csv" ] || python -c "from epicfeat.data.synthetic import \
SyntheticSpec, generate_synthetic_dataset as g; g('$out/data', seed=0, \
spec=SyntheticSpec.tiny() if '$spec' == 'tiny' else SyntheticSpec())" >/dev/null
    annotations=$out/data/annotations cache=$out/cache
    for split in train validation; do  # the demo's feature set: random weights, 10 rows/s, 128 -> 112 crops
        epicfeat extract --split "$split" --videos "$out/data/videos" --annotations "$annotations" --cache "$cache" \
            --weights random --resize 128 --crop 112 --precision fp32 --no-progress
    done
    TEMPORAL_ARGS=${TEMPORAL_ARGS:-"--frames 16 --hidden 128 --width 128 --attention-heads 4 --epochs 30 \
--batch-size 16 --micro-batch-size 16 --lr 1e-3 --warmup-epochs 2 --patience 0"}
else
    annotations=$1 cache=$2 out=${3:-runs/compare_heads}
fi
read -r -a temporal_args <<< "${TEMPORAL_ARGS:-}"
common=(--annotations "$annotations" --cache "$cache" --no-progress)
resume_if() { [ -f "$1/last.pt" ] && echo --resume || true; }

runs=()
train() {  # train NAME FLAGS...: one run, resumed when a killed comparison left it
    local run=$out/$1; shift
    epicfeat train-temporal --out "$run" $(resume_if "$run") "${common[@]}" "${temporal_args[@]}" "$@"
    runs+=("$run")
}
train head_1frame --head lstm --frames 1  # the baseline: one row per segment sees no order
for head in ${HEADS:-lstm transformer attentive mean}; do
    extra_name=HEAD_ARGS_$head
    read -r -a extra <<< "${!extra_name:-}"
    train "head_$head" --head "$head" "${extra[@]}"
done

python -m epicfeat.temporal.compare --annotations "$annotations" --cache "$cache" --out "$out/compare" "${runs[@]}"
