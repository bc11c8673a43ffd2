#!/usr/bin/env bash
# The fine-tuning loop: stage two -> finetune -> re-extract with the fine-tuned backbone -> stage two again, and a
# verdict that compares the first and the final stage-two model on validation (loop_summary.json).
#
#   bash pipelines/finetune_loop.sh ANNOTATIONS_DIR VIDEOS_DIR [OUT_DIR]
#   bash pipelines/finetune_loop.sh --synthetic [OUT_DIR]      # the demo's tiny synthetic dataset, CPU, minutes
#
# Each round has its own cache folder (OUT/cache_first, OUT/cache_final), so each stage two finds exactly one
# feature set. finetune's best.pt is never worse on validation than the model it started from (epoch 0 is scored
# first and stays best.pt until an epoch beats it); the final stage-two model is retrained from scratch on the new
# features, so the summary says which of the two stage-two models is better, and KEEP names that one.
# Settings: WEIGHTS (first backbone, default imagenet), plus extra flags per command in EXTRACT_ARGS,
# TEMPORAL_ARGS and FINETUNE_ARGS (e.g. FINETUNE_ARGS="--epochs 3 --num-workers 8").
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--synthetic" ]; then
    out=${2:-runs/finetune_loop_synthetic}
    mkdir -p "$out"
    # The demo's synthetic dataset, SPEC=tiny (default: 6 videos of ~4 s, a CPU run of minutes) or SPEC=default
    # (the demo's 18 videos, 6 min of video), random backbone, small crops and models.
    spec=${SPEC:-tiny}
    [ "$spec" = tiny ] || [ "$spec" = default ] || { echo "SPEC must be tiny or default, got $spec" >&2; exit 2; }
    [ -f "$out/data/annotations/EPIC_100_train.csv" ] || python -c "from epicfeat.data.synthetic import \
SyntheticSpec, generate_synthetic_dataset as g; g('$out/data', seed=0, \
spec=SyntheticSpec.tiny() if '$spec' == 'tiny' else SyntheticSpec())" >/dev/null
    annotations=$out/data/annotations videos=$out/data/videos
    WEIGHTS=${WEIGHTS:-random}
    EXTRACT_ARGS=${EXTRACT_ARGS:-"--resize 72 --crop 64 --precision fp32 --decode-workers 0 --device cpu"}
    TEMPORAL_ARGS=${TEMPORAL_ARGS:-"--frames 4 --hidden 16 --layers 1 --lstm-dropout 0 --dropout 0 --epochs 30 \
--lr 1e-2 --warmup-epochs 1 --batch-size 4 --micro-batch-size 4 --patience 0 --device cpu"}
    FINETUNE_ARGS=${FINETUNE_ARGS:-"--epochs 2 --batch-size 4 --micro-batch-size 2 --num-workers 0 --device cpu \
--lr 1e-4 --backbone-lr 1e-4 --warmup-epochs 0 --trainable-stages 1"}
else
    annotations=$1 videos=$2 out=${3:-runs/finetune_loop}
fi
WEIGHTS=${WEIGHTS:-imagenet}
read -r -a extract_args <<< "${EXTRACT_ARGS:-}"
read -r -a temporal_args <<< "${TEMPORAL_ARGS:-}"
read -r -a finetune_args <<< "${FINETUNE_ARGS:-}"
common=(--annotations "$annotations" --no-progress)
resume_if() { [ -f "$1/last.pt" ] && echo --resume || true; }

extract() {  # extract WEIGHTS CACHE: train and validation features
    for split in train validation; do
        epicfeat extract --split "$split" --videos "$videos" --cache "$2" --weights "$1" "${common[@]}" "${extract_args[@]}"
    done
}

# 1. Stage one and stage two on the first backbone.
extract "$WEIGHTS" "$out/cache_first"
epicfeat train-temporal --cache "$out/cache_first" --out "$out/temporal_first" $(resume_if "$out/temporal_first") \
    "${common[@]}" "${temporal_args[@]}"

# 2. Fine-tune backbone + temporal model end to end, from that checkpoint (clips at its feature set's row times).
epicfeat finetune --checkpoint "$out/temporal_first/best.pt" --cache "$out/cache_first" --videos "$videos" \
    --out "$out/finetune" $(resume_if "$out/finetune") "${common[@]}" "${finetune_args[@]}"

# 3. Stage one again with the fine-tuned backbone (a feature set named by the weights' hash), then stage two.
extract "$out/finetune/best.pt" "$out/cache_final"
epicfeat train-temporal --cache "$out/cache_final" --out "$out/temporal_final" $(resume_if "$out/temporal_final") \
    "${common[@]}" "${temporal_args[@]}"

# 4. First vs final stage-two model on validation (each best.pt holds its validation metrics).
python - "$out" <<'EOF'
import json, sys
from pathlib import Path
from epicfeat.temporal.checkpoint import load_checkpoint

out = Path(sys.argv[1])
keys = ("all_verb_accuracy_at_1", "all_noun_accuracy_at_1", "all_action_accuracy_at_1", "val_loss")
runs = {name: load_checkpoint(out / name / "best.pt") for name in ("temporal_first", "finetune", "temporal_final")}
summary = {name: {"epoch": c.epoch, **{k: c.metrics.get(k) for k in keys}} for name, c in runs.items()}
first, final = summary["temporal_first"], summary["temporal_final"]
holds = final["all_action_accuracy_at_1"] >= first["all_action_accuracy_at_1"]
summary["final_at_least_as_good"] = holds
summary["keep"] = str(out / ("temporal_final" if holds else "temporal_first") / "best.pt")
(out / "loop_summary.json").write_text(json.dumps(summary, indent=2))
for name, row in summary.items():
    print(f"{name:>24}: {row}")
EOF
