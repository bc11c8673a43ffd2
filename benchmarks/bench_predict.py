"""Throughput of `epicfeat predict` against the seed's demo approach, side by side in one run.

    python benchmarks/bench_predict.py [--frames 16 32] [--stride 4] [--precision fp32|bf16] [--threads N] [--device cpu]

For each window length T, with the seed architecture's head (BiLSTM 2x512, 97 verbs, 300 nouns) on a random-seed0
ResNet50 at 10 fps and the given crop:

* ours: ``predict()`` end to end on a synthetic video (decoding, the backbone once per sampled frame, the head
  every ``stride`` frames): sampled frames/s and predictions/s.
* seed: the seed's webcam demo re-runs the backbone over the whole window for every prediction. Measured on the
  same already-decoded frames (its decoding cost is left out, which flatters it), one batch of T frames per
  prediction, a prediction every ``stride`` frames: frames/s = stride x predictions/s.

The ratio is ours / seed at the same stride (about T / stride when the backbone dominates). Random weights cost
exactly what ImageNet weights cost. Both sides get one untimed warm-up pass. The two are measured in alternation,
``--repeats`` times, and the medians are reported, so that load from other processes on a shared machine hits
both sides alike.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from epicfeat.backbone import create_backbone
from epicfeat.data.synthetic import SyntheticSpec, generate_synthetic_dataset
from epicfeat.frames import Preprocess, iter_frames, probe_video
from epicfeat.predict import FrameEncoder, PredictConfig, predict
from epicfeat.store import FeatureSetIdentity
from epicfeat.temporal.checkpoint import load_checkpoint, save_checkpoint
from epicfeat.temporal.model import TemporalModelArgs, create_temporal_model
from epicfeat.temporal.train import resolve_device


def make_checkpoint(path: Path, frames: int, preprocess: Preprocess, precision: str) -> Path:
    backbone = create_backbone("random", seed=0)
    identity = FeatureSetIdentity(weights=backbone.weights_name, weights_sha=backbone.weights_sha, fps=10.0,
                                  resize=preprocess.resize, crop=preprocess.crop, mean=preprocess.mean,
                                  std=preprocess.std, precision=precision)
    args = TemporalModelArgs(n_verbs=97, n_nouns=300)
    torch.manual_seed(0)
    model = create_temporal_model(args)
    return save_checkpoint(path, model=model, model_args=args, config={"frames": frames},
                           verb_classes=[f"verb{i}" for i in range(97)], noun_classes=[f"noun{i}" for i in range(300)],
                           feature_set=identity.to_dict(), feature_set_key=identity.key(), epoch=1, metrics={},
                           history=[])


@torch.inference_mode()
def seed_approach(checkpoint: Path, images: np.ndarray, stride: int, device: torch.device, n_predictions: int,
                  precision: str):
    """The seed demo's loop: for each prediction, the backbone over all T frames of the window, then the head."""
    ckpt = load_checkpoint(checkpoint)
    window = ckpt.config["frames"]
    encoder = FrameEncoder(create_backbone("random", seed=0), Preprocess(ckpt.feature_set["resize"],
                           ckpt.feature_set["crop"]), device, precision=precision, feature_dtype="float16",
                           channels_last=True, compile=False)
    head = ckpt.create_model(device)
    head(encoder(images[:window])[None])  # warm-up, untimed
    ends = list(range(window - 1, len(images), stride))[:n_predictions]
    started = time.perf_counter()
    for end in ends:
        features = encoder(images[end - window + 1: end + 1])  # (T, 2048): every frame again, every window
        verb_logits, noun_logits = head(features[None])  # (1, T, 2048) -> (1, Cv), (1, Cn)
        verb_logits.cpu(), noun_logits.cpu()
    seconds = time.perf_counter() - started
    return len(ends) / seconds, len(ends)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 32], help="window lengths T")
    parser.add_argument("--stride", type=int, default=4, help="sampled frames between predictions")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of video for our pipeline, per repeat")
    parser.add_argument("--seed-predictions", type=int, default=2, help="seed-approach predictions timed per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="alternating ours/seed measurements (medians shown)")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8, help="frames per backbone call in predict")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="backbone autocast, recorded in the feature set (extract's default is bf16)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    preprocess = Preprocess(resize=args.crop * 8 // 7, crop=args.crop)  # 256 / 224, as in extract
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # The demo-size synthetic dataset; its longest video, so that warm-up windows are a small share of the run.
        dataset = generate_synthetic_dataset(tmp / "synthetic", seed=0, spec=SyntheticSpec())
        video = max(sorted(Path(dataset.videos).rglob("*.MP4")), key=lambda p: probe_video(p).duration)
        images = np.concatenate([b.images for b in iter_frames(video, fps=10.0, preprocess=preprocess)])  # (n, c, c, 3)
        print(f"device {device} {args.precision}, {torch.get_num_threads()} threads, crop {args.crop}, 10 fps, stride "
              f"{args.stride}, torch {torch.__version__}; video {video.name} ({probe_video(video).duration:.1f} s)")
        print(f"{'T':>3} {'ours frames/s':>14} {'ours pred/s':>12} {'ours latency ms':>16} "
              f"{'seed frames/s':>14} {'seed pred/s':>12} {'ratio':>6}")
        for frames in args.frames:
            checkpoint = make_checkpoint(tmp / f"t{frames}.pt", frames, preprocess, args.precision)
            rounds = []  # (ours frames/s, ours pred/s, ours median latency ms, seed pred/s) per repeat
            for _ in range(args.repeats):
                ours = predict(PredictConfig(source=str(video), checkpoint=checkpoint, stride=args.stride,
                                             max_seconds=args.seconds, batch_size=args.batch_size,
                                             device=args.device, progress=False))
                seed_pred_s, _ = seed_approach(checkpoint, images, args.stride, device, args.seed_predictions,
                                              args.precision)
                rounds.append((ours.frames_per_second, ours.predictions_per_second, ours.latency_ms(0.5),
                               seed_pred_s))
            ours_fps, ours_pred_s, latency, seed_pred_s = np.median(np.array(rounds), axis=0)  # (4,)
            seed_frames_s = seed_pred_s * args.stride
            print(f"{frames:>3} {ours_fps:>14.2f} {ours_pred_s:>12.2f} {latency:>16.0f} {seed_frames_s:>14.2f} "
                  f"{seed_pred_s:>12.3f} {ours_fps / seed_frames_s:>6.2f}")


if __name__ == "__main__":
    main()
