#!/usr/bin/env bash
# EPIC-KITCHENS-100 end to end on one machine: ImageNet features once, the seed's 16- and 32-frame BiLSTMs, their
# validation metrics and ensemble, and the test submission. Every step resumes: re-run the script after a crash.
#
#   bash pipelines/epic100_end_to_end.sh ANNOTATIONS_DIR VIDEOS_DIR [OUT_DIR]
#
# ANNOTATIONS_DIR holds the EPIC_100_*.csv files; VIDEOS_DIR is <root>/P01/P01_01.MP4 or <root>/P01/videos/P01_01.MP4.
# On a cluster, run the extraction with pipelines/slurm_extract.sbatch first; this script then skips it.
set -euo pipefail
annotations=$1 videos=$2 out=${3:-runs/epic100}
cd "$(dirname "$0")/.."

# 1. Features of every video (train, validation, test): 10 rows/s, ImageNet ResNet50, resumable.
epicfeat extract --split all --videos "$videos" --annotations "$annotations" --cache cache --weights "${WEIGHTS:-imagenet}"

# 2. The seed's two temporal models (configs/temporal_16f.yaml, temporal_32f.yaml); --resume continues a run.
for frames in 16 32; do
    run="$out/temporal_${frames}f"
    resume=(); [ -f "$run/last.pt" ] && resume=(--resume)
    epicfeat train-temporal --config "configs/temporal_${frames}f.yaml" --annotations "$annotations" --cache cache \
        --out "$run" "${resume[@]}"
done
models=(--checkpoint "$out/temporal_16f/best.pt" --checkpoint "$out/temporal_32f/best.pt")

# 3. Validation: each model, then the ensemble (averaged probabilities).
for frames in 16 32; do
    epicfeat evaluate --annotations "$annotations" --cache cache --checkpoint "$out/temporal_${frames}f/best.pt" \
        --out "$out/evaluate_${frames}f"
done
epicfeat evaluate --annotations "$annotations" --cache cache "${models[@]}" --out "$out/evaluate_ensemble"

# 4. The test submission of the ensemble: upload $out/submit/submission.zip.
#    (For a final entry, retrain both models with --train-splits train+validation; submit then sets sls_td=4.)
epicfeat submit --annotations "$annotations" --cache cache "${models[@]}" --out "$out/submit"
