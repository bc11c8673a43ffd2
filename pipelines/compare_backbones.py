"""Compare backbones in one command: extract the same videos with each, train the same temporal head on each feature
set, evaluate each on validation, and print one table (verb / noun / action top-1, tail and unseen, feature width,
extraction rows/s, cache size) with a bar chart. Every step resumes: re-run the command after a crash.

    python pipelines/compare_backbones.py --annotations A --videos V \\
        --backbones resnet50,timm:convnext_tiny.fb_in1k,timm:vit_small_patch14_dinov2.lvd142m \\
        --train-config configs/temporal_16f.yaml --out runs/compare_backbones

    # the demo's synthetic data (generated into --synthetic when absent), random weights, small crops, in minutes:
    python pipelines/compare_backbones.py --synthetic demo_out/data --weights random \\
        --backbones resnet50,timm:resnet18,timm:vit_tiny_patch16_224 --extract crop=112 \\
        --train-config configs/compare_demo.yaml --out runs/compare_demo

``--extract KEY=VALUE`` and ``--train KEY=VALUE`` set any option of ``epicfeat extract`` / ``train-temporal`` (YAML
values, e.g. ``--extract precision=bf16``); writes ``<out>/<backbone>/{extract.json,temporal/,evaluate/}`` and
``<out>/comparison.{md,json,png}``.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

from epicfeat.backbone import canonical_backbone
from epicfeat.comparison import Row, write_comparison
from epicfeat.configs import EvaluateConfig, ExtractConfig, TrainTemporalConfig
from epicfeat.errors import EpicfeatError
from epicfeat.evaluate import evaluate
from epicfeat.extract import extract_features, print_summary
from epicfeat.recipes import resolve_config
from epicfeat.store import FeatureStore, folder_bytes
from epicfeat.temporal.train import train_temporal


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", required=True, type=lambda s: s.split(","), help="comma-separated --backbone")
    parser.add_argument("--weights", default="pretrained", help="--weights of every backbone (pretrained)")
    parser.add_argument("--annotations", type=Path, help="folder with EPIC_100_*.csv")
    parser.add_argument("--videos", type=Path, help="video root")
    parser.add_argument("--synthetic", type=Path, help="use (and make when absent) the demo's synthetic data here")
    parser.add_argument("--cache", type=Path, default=Path("cache"), help="folder of feature sets (cache)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare_backbones"))
    parser.add_argument("--train-config", type=Path, help="train-temporal recipe (YAML) every head is trained with")
    parser.add_argument("--extract", action="append", default=[], metavar="KEY=VALUE", help="extract option")
    parser.add_argument("--train", action="append", default=[], metavar="KEY=VALUE", help="train-temporal option")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    for backbone in args.backbones:  # a mistyped name stops the command before hours of extraction, not after
        canonical_backbone(backbone)
    if args.synthetic is not None:
        from epicfeat.data.synthetic import generate_synthetic_dataset

        dataset = generate_synthetic_dataset(args.synthetic, seed=0)  # the demo's default dataset, reused if there
        args.annotations, args.videos = dataset.annotations, dataset.videos
    if args.annotations is None or args.videos is None:
        raise SystemExit("pass --annotations and --videos (or --synthetic DIR)")
    rows = []
    for backbone in args.backbones:
        run = args.out / re.sub(r"[^A-Za-z0-9._-]+", "-", backbone)
        # 1. features of every video (train, validation, test)
        extract_config = resolve_config(ExtractConfig, overrides={
            **_pairs(args.extract), "split": "all", "videos": args.videos, "annotations": args.annotations,
            "cache": args.cache, "backbone": backbone, "weights": args.weights})
        summary = extract_features(extract_config)
        print_summary(summary)
        if not summary.ok:
            raise SystemExit(f"{backbone}: some videos failed (above); fix them and re-run to resume")
        speed = run / "extract.json"  # this backbone's extraction speed, kept for re-runs that extract nothing
        if summary.rows:
            speed.parent.mkdir(parents=True, exist_ok=True)
            speed.write_text(json.dumps({"rows": summary.rows, "seconds": summary.seconds}))
        measured = json.loads(speed.read_text()) if speed.is_file() else None
        # 2. the same head on this feature set
        train_config = resolve_config(TrainTemporalConfig, config_file=args.train_config, overrides={
            **_pairs(args.train), "annotations": args.annotations, "cache": args.cache,
            "feature_set": summary.store.name, "out": run / "temporal",
            "resume": (run / "temporal" / "last.pt").is_file()})
        trained = train_temporal(train_config)
        # 3. validation metrics
        metrics = evaluate(EvaluateConfig(checkpoints=(trained.best_checkpoint,), annotations=args.annotations,
                                          cache=args.cache, feature_set=summary.store.name, out=run / "evaluate",
                                          progress=False)).metrics
        identity = FeatureStore.open(summary.store).identity
        rows.append(Row(backbone, metrics, {
            "width": identity.feature_dim, "crop": identity.crop,
            "extract rows/s": measured["rows"] / measured["seconds"] if measured else None,
            "cache MB": folder_bytes(summary.store) / 1e6}))
    note = (f"--weights {args.weights}: " + ("seeded random weights; these numbers show the pipeline runs, not how "
                                             "good the backbones' features are." if args.weights == "random" else
                                             "each backbone's pretrained weights."))
    write_comparison(rows, args.out, title=f"backbones compared ({args.weights} weights, same head)", note=note)


def _pairs(items: list[str]) -> dict:
    """KEY=VALUE strings -> {key: YAML value}."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{item!r}: expected KEY=VALUE")
        pairs[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return pairs


if __name__ == "__main__":
    try:
        main()
    except EpicfeatError as err:  # bad input: one line, exit 2, as every epicfeat command answers it
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
