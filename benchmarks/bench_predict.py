"""Sustained throughput of `epicfeat predict` beside ResNet50's own rate, side by side in one run.

    python benchmarks/bench_predict.py [--frames 16 32] [--crop 224] [--precision bf16] [--seconds 8] [--threads N]
                                       [--stride 4] [--repeats 1] [--skip-file] [--gpu]

For each window length T, with the seed architecture's head (BiLSTM 2x512, 97 verbs, 300 nouns) on a random-seed0
ResNet50 at the given crop (random weights cost exactly what ImageNet weights cost):

* resnet50: the backbone alone (the feature set's ``FrameEncoder.encode``: normalisation, autocast, float16
  rounding, as predict runs it) on frames already decoded and cropped, batch 1 like a camera run: the rate nothing downstream can beat.
* live: ``predict()`` on a capture device, FFmpeg's lavfi ``testsrc2=size=640x360:rate=30,realtime`` (paced like a
  camera), sampled at 30 frames/s so that the camera offers more frames than the model can take: frames/s through
  the backbone (the rest dropped, counted), capture-to-prediction latency. ratio = live / min(resnet50, 30): a
  backbone faster than the camera can only reach the camera's rate.
* file: ``predict()`` on a synthetic video (decoding, the backbone once per sampled frame at the feature set's batch
  size, the head every ``stride`` frames), against the backbone alone at that batch size.

The goal is a ratio of at least 0.9: the capture thread, the window, the head and the timeline cost at most a
tenth of the backbone. The measurements alternate ``--repeats`` times and the medians are shown, so that load from
other processes on a shared machine hits all sides alike. The first line says the CPU and whether it has native
bf16: quote a number with it.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

# First: importing common puts the checkout on sys.path, before any epicfeat import.
from common import add_gpu, machine_line, new_parser, synthetic_dataset

import numpy as np
import torch

from epicfeat.backbone import create_backbone
from epicfeat.data.synthetic import SyntheticSpec
from epicfeat.devices import resolve_device
from epicfeat.encoder import FrameEncoder, create_encoder
from epicfeat.extract import ExtractConfig, feature_set_identity
from epicfeat.frames import Preprocess, iter_frames, probe_video
from epicfeat.predict import PredictConfig, predict
from epicfeat.temporal.checkpoint import ModelCard, feature_set_key_of, save_checkpoint
from epicfeat.temporal.model import TemporalModelArgs, create_temporal_model

CAMERA = "testsrc2=size=640x360:rate=30,realtime"
CAMERA_FPS = 30.0


def parse_args(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 32], help="window lengths T")
    parser.add_argument("--stride", type=int, default=4, help="sampled frames between predictions")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per measurement, per repeat")
    parser.add_argument("--repeats", type=int, default=1, help="alternating measurements (medians shown)")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--file-batch-size", type=int, default=8, help="the feature set's (extract) batch size")
    parser.add_argument("--device", default="cpu")
    add_gpu(parser, "--device cuda (benchmarks/gpu_check.sh's step; the camera's 30 frames/s then bound the live "
                    "side, the file side shows the backbone's rate)", dry_run=False)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"],
                        help="backbone autocast, recorded in the feature set (extract's default on CPU with bf16)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--skip-file", action="store_true", help="only the live measurement")
    parser.add_argument("--out", type=Path, default=None, help="also save the numbers as JSON to this file")
    args = parser.parse_args(argv)
    if args.gpu:
        args.device = "cuda"
    return args


def feature_set(preprocess: Preprocess, precision: str, fps: float, batch_size: int) -> dict:
    """The identity extract records for a random-seed0 ResNet50 run so."""
    extract = ExtractConfig(weights="random", fps=fps, resize=preprocess.resize, crop=preprocess.crop,
                            precision=precision, batch_size=batch_size)
    return feature_set_identity(extract, create_backbone("random", seed=0)).to_dict()


def make_checkpoint(path: Path, frames: int, identity: dict) -> Path:
    args = TemporalModelArgs(n_verbs=97, n_nouns=300)
    torch.manual_seed(0)
    model = create_temporal_model(args)
    # The stage-two run trained in the same precision (train-temporal's auto matches extract's), so its head does too.
    card = ModelCard(config={"frames": frames, "precision": identity["precision"]},
                     verb_classes=[f"verb{i}" for i in range(97)], noun_classes=[f"noun{i}" for i in range(300)],
                     feature_set=identity, feature_set_key=feature_set_key_of(identity))
    return save_checkpoint(path, model=model, card=card, epoch=1, metrics={}, history=[])


def backbone_rate(encoder: FrameEncoder, images: np.ndarray, batch_size: int, seconds: float) -> float:
    """Frames/s of the backbone alone over already-cropped frames, for about ``seconds``."""
    def encode(batch: np.ndarray) -> None:
        encoder.encode(torch.from_numpy(batch).permute(0, 3, 1, 2))  # (B, crop, crop, 3) -> (B, 2048) float16
        if encoder.pixel_mean.is_cuda:
            torch.cuda.synchronize()  # as predict times its backbone calls

    encode(images[:batch_size])  # warm-up, untimed
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        begin = done % (len(images) - batch_size)
        encode(images[begin: begin + batch_size])
        done += batch_size
    return done / (time.perf_counter() - started)


def one_round(args, encoder: FrameEncoder, images: np.ndarray, video: Path, live_checkpoint: Path,
              file_checkpoint: Path) -> tuple[float, ...]:
    """(backbone b1, live f/s, dropped per camera second, latency ms, backbone bN, file f/s): one alternation."""
    alone_1 = backbone_rate(encoder, images, 1, args.seconds / 2)
    live = predict(PredictConfig(source=CAMERA, camera_format="lavfi", checkpoint=live_checkpoint,
                                 stride=args.stride, max_seconds=args.seconds, device=args.device, progress=False))
    dropped = live.frames_dropped / args.seconds  # per second of camera
    if args.skip_file:
        alone_n = file_fps = float("nan")
    else:
        alone_n = backbone_rate(encoder, images, args.file_batch_size, args.seconds / 2)
        file_fps = predict(PredictConfig(source=str(video), checkpoint=file_checkpoint, stride=args.stride,
                                         max_seconds=args.seconds * 3, device=args.device,
                                         progress=False)).frames_per_second
    return alone_1, live.frames_per_second, dropped, live.latency_ms(0.5), alone_n, file_fps


def print_header(args, device: torch.device, video: Path) -> None:
    print(f"device {device} {args.precision}, {torch.get_num_threads()} threads, crop {args.crop}, stride "
          f"{args.stride}, torch {torch.__version__}; camera lavfi {CAMERA} sampled at 30 fps; file "
          f"{video.name} at 10 fps, batch {args.file_batch_size}")
    print(f"{'T':>3} {'resnet50 b1':>12} {'live f/s':>9} {'ratio':>6} {'dropped':>8} {'latency ms':>11} "
          f"{'resnet50 bN':>12} {'file f/s':>9} {'ratio':>6}")


def print_row(frames: int, rounds: list[tuple[float, ...]]) -> dict:
    """One line per T, as soon as it is measured (a run cut short by a time limit keeps the lines so far)."""
    medians = np.median(np.array(rounds), axis=0)  # (6,)
    alone_1, live_fps, dropped, latency, alone_n, file_fps = (float(v) for v in medians)
    print(f"{frames:>3} {alone_1:>12.2f} {live_fps:>9.2f} {live_fps / min(alone_1, CAMERA_FPS):>6.2f} "
          f"{dropped:>6.1f}/s {latency:>11.0f} {alone_n:>12.2f} {file_fps:>9.2f} {file_fps / alone_n:>6.2f}",
          flush=True)
    return {"backbone_b1_fps": alone_1, "live_fps": live_fps, "dropped_per_s": dropped, "latency_ms": latency,
            "backbone_bN_fps": alone_n, "file_fps": file_fps}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    device = resolve_device(args.device)
    preprocess = Preprocess(resize=args.crop * 8 // 7, crop=args.crop)  # 256 / 224, as in extract
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset, _ = synthetic_dataset(tmp / "synthetic", SyntheticSpec.tiny())
        video = max(sorted(Path(dataset.videos).rglob("*.MP4")), key=lambda p: probe_video(p).duration)
        images = np.concatenate([b.images for b in iter_frames(video, fps=10.0, preprocess=preprocess)])
        images = images[:64]  # (n, crop, crop, 3)
        live_set = feature_set(preprocess, args.precision, CAMERA_FPS, 1)
        file_set = feature_set(preprocess, args.precision, 10.0, args.file_batch_size)
        encoder = create_encoder(file_set, device)  # what predict runs (the batch size is the call's, not the set's)
        print_header(args, device, video)
        results = {}
        for frames in args.frames:
            live_checkpoint = make_checkpoint(tmp / f"live{frames}.pt", frames, live_set)
            file_checkpoint = make_checkpoint(tmp / f"file{frames}.pt", frames, file_set)
            results[f"T{frames}"] = print_row(frames, [one_round(args, encoder, images, video, live_checkpoint,
                                                                  file_checkpoint) for _ in range(args.repeats)])
            if args.out:  # after each T: a run cut short keeps what was measured
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"machine": machine_line(), "device": str(device), **results},
                                               indent=2))


if __name__ == "__main__":
    main()
