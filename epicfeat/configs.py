"""The config dataclass of every command: the one source of each default and of each option's help text.

``epicfeat.cli`` builds every command's options from these fields, so ``--help`` shows the defaults the code runs
with. No torch here: ``epicfeat --help`` and a typo in a flag answer at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from epicfeat.recipes import ConfigError, option

Precision = Literal["auto", "fp32", "bf16", "fp16"]
ExportFormat = Literal["onnx", "torchscript", "coreml"]
POOLINGS = ("mean", "max", "last", "attention")
HEADS = ("lstm", "transformer", "attentive", "mean")
SLS_TL_FULL_TEMPORAL = 3  # trained on segment start/stop times and verb/noun labels


@dataclass(frozen=True)
class ExtractConfig:
    # what to extract
    split: Literal["train", "validation", "test", "all"] = option(
        "train", "Which split's videos (listed by the annotation CSVs)."
    )
    video_ids: tuple[str, ...] = option(
        (), "Video ids instead of a split (repeat the option or separate with commas: P01_01,P01_02)."
    )
    videos: Path | None = option(
        None, "Video root: <root>/P01/P01_01.MP4, <root>/P01/videos/P01_01.MP4, the official RGB frames "
        "<root>/P01/rgb_frames/P01_01/ or <root>/P01/rgb_frames/P01_01.tar."
    )
    video_path: str | None = option(
        None, "Any other layout: a template such as '{root}/{participant}/{video}.MP4' naming a video file, a frames "
        "folder or a .tar of frames."
    )
    source: Literal["auto", "video", "frames"] = option(
        "auto", "Which form to read (one per feature set); auto: the form that finds more of the videos, video files "
        "on a tie."
    )
    frames_fps: float | None = option(
        None, "Rate of the JPEG frames (frame k at (k - 1) / rate s); default: EPIC's, 60 for EPIC-55 ids, 50 for "
        "extension ids (Pxx_1yy)."
    )
    annotations: Path | None = option(None, "Folder with EPIC_100_*.csv (needed for --split).")
    cache: Path = option(Path("cache"), "Folder of feature sets: <cache>/<feature set key>/.")
    # what defines the feature set (all of it goes into the feature set's identity)
    backbone: str = option(
        "resnet50", "resnet50 (torchvision's ResNet50, 2048-d) | timm:<model name> (any timm image model, e.g. "
        "timm:vit_small_patch14_dinov2.lvd142m or timm:convnext_tiny; its pooled pre-logits) | torchvision:<video "
        "model> (Kinetics-400 r2plus1d_18, mvit_v2_s, swin3d_t, s3d, ...: a row is the clip the weights were evaluated "
        "on, centred at the row's time). The preprocessing defaults come from the model's pretrained configuration."
    )
    weights: str = option(
        "pretrained", "pretrained (the backbone's default pretrained weights, through torch hub's or the Hugging "
        "Face hub's cache; resnet50's = imagenet = imagenet1k_v2) | imagenet1k_v1 (resnet50) | random (seeded) | PATH "
        "of a state dict (.safetensors too) or epicfeat checkpoint."
    )
    seed: int = option(0, "Seed of --weights random.")
    fps: float | None = option(10.0, "Feature rows per second of video.")
    resize: int | None = option(
        None, "Shorter side before the centre crop; default: crop / the backbone's pretrained crop_pct (resnet50: 256)."
    )
    crop: int | None = option(None, "Centre crop size (pixels); default: the backbone's pretrained input size (224).")
    mean: tuple[float, float, float] | None = option(
        None, "Normalisation mean per RGB channel; default: the backbone's pretrained one (ImageNet's).", cli=False
    )
    std: tuple[float, float, float] | None = option(
        None, "Normalisation std per RGB channel; default: the backbone's pretrained one (ImageNet's).", cli=False
    )
    interpolation: Literal["bilinear", "bicubic"] | None = option(
        None, "Resize filter; default: the backbone's pretrained one (resnet50: bilinear).", cli=False
    )
    precision: Precision = option(
        "auto", "Backbone compute precision; auto: bf16 on a GPU and on a CPU with native bf16 (AMX / AVX512-BF16), "
        "else fp32. Features are stored as float16 either way; the resolved value is part of the feature set."
    )
    # how to run it (batch size, channels_last, compile and fold_bn can move a float16 by one step: all four are keyed)
    batch_size: int = option(64, "Frames per model batch.")
    decode_workers: int = option(-1, "Decode processes; -1: one per spare core, at most 8 (0: decode in this process).")
    decode_threads: int = option(
        0, "Codec threads per decode process; 0: the cores shared out among the decode processes (FFmpeg's choice when "
        "decoding in this process)."
    )
    device: str = option("auto", "auto | cpu | cuda | cuda:N.")
    channels_last: bool = option(True, "Channels-last memory layout for the backbone (faster convolutions).")
    compile: bool = option(False, "torch.compile the backbone (GPU; pays off on long runs).")
    fold_bn: bool | None = option(
        None, "Fold each batch norm of resnet50 into the convolution before it; default auto: on a CPU (1.3x faster "
        "there), off on a GPU (0.86x there) and for other backbones. The features equal torchvision's unfolded modules "
        "up to rounding; the "
        "resolved choice is part of the feature set, and predict and export follow it."
    )
    scheduler: str | None = option(
        None,
        "Dask scheduler address to join; \"local\" starts a LocalCluster; \"slurm\" submits --workers SLURM jobs "
        "through dask-jobqueue (one GPU each)."
    )
    workers: int = option(2, "LocalCluster workers with --scheduler local (SLURM jobs with --scheduler slurm).")
    claim_lease_s: float = option(
        60.0, "Seconds after which the claim of a writer that stopped renewing it (killed) is stale and its video is "
        "taken over by another extract sharing the cache."
    )
    progress: bool = option(True, "A progress bar with the rate and ETA (the summary table is printed either way).")

    def __post_init__(self) -> None:
        for name in ("fps", "frames_fps", "claim_lease_s"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("batch_size", "resize", "crop", "workers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class TrainTemporalConfig:
    # --- data
    annotations: Path | None = option(None, "Folder with EPIC_100_*.csv (class tables, segments, tail / unseen CSVs).")
    train_file: str = option(
        "EPIC_100_train.csv", "Train CSV in that folder (e.g. EPIC_100_uda_source_train.csv, a subset)."
    )
    cache: Path = option(Path("cache"), "Folder of feature sets (<cache>/<feature set key>/).")
    feature_set: str | None = option(
        None, "Key (folder name under cache) or path of the feature set; None: the only one."
    )
    train_splits: Literal["train", "train+validation"] = option(
        "train", "train: validate and stop early; train+validation: the final model for the test submission (no "
        "validation, best.pt = last epoch)."
    )
    out: Path = option(
        Path("runs/temporal"), "This run's folder: checkpoints, metrics.csv, plots, tensorboard/, config.yaml."
    )
    resume: bool = option(False, "Continue the run in --out from its last.pt (same schedule, RNG and data order).")
    # --- sampling
    frames: int = option(
        16, "T rows per segment, TSN-style: a random row in each of T equal bins (train), bin centres (eval)."
    )
    pack_cache: bool = option(
        True, "Keep each packed split on disk (<cache>/.packed/<feature set>/) so later runs on the same feature set "
        "and segments (other T, resumes) load it in seconds instead of re-reading Zarr."
    )
    context_seconds: float = option(
        0.0, "Context: the head also sees rows from this many seconds before and after each segment (marked as "
        "context by a learned vector); 0: the segment's rows only."
    )
    context_frames: int = option(
        8, "Rows sampled from each side's context with --context-seconds > 0, by the segment's rule (a random row in "
        "each of K equal bins when training, bin centres otherwise)."
    )
    # --- model (TemporalModelArgs)
    head: Literal["lstm", "transformer", "attentive", "mean"] = option(
        "lstm", "Temporal head: lstm (the seed's BiLSTM), transformer (a pre-norm transformer encoder with learned "
        "positions), attentive (learned queries cross-attending to the rows), mean (TSN: the classifiers' scores of "
        "each row averaged; cannot see order)."
    )
    hidden: int = option(512, "LSTM units per direction (--head lstm).")
    layers: int = option(2, "Stacked BiLSTM layers (--head lstm).")
    lstm_dropout: float = option(0.3, "Dropout between LSTM layers (--head lstm).")
    pooling: Literal["mean", "max", "last", "attention"] = option(
        "mean", "Pooling of the BiLSTM outputs over the segment's rows (--head lstm)."
    )
    width: int = option(512, "Model width of the transformer and attentive heads (rows are projected to it).")
    depth: int = option(2, "Transformer encoder layers (--head transformer).")
    attention_heads: int = option(8, "Attention heads of the transformer and attentive heads (must divide --width).")
    attention_dropout: float = option(0.1, "Dropout inside the transformer and attentive blocks.")
    queries: int = option(1, "Learned queries of the attentive head; their outputs are concatenated.")
    dropout: float = option(0.5, "Dropout before the verb / noun classifiers.")
    # --- optimisation (the seed's recipe)
    epochs: int = option(50, "Maximum epochs (the LR schedule spans all of them).")
    lr: float = option(1.5e-4, "Peak AdamW learning rate, reached at the end of the warm-up.")
    min_lr: float = option(0.0, "Learning rate the cosine decays to at the last step.")
    weight_decay: float = option(1e-4, "AdamW (decoupled) weight decay.")
    warmup_epochs: float = option(3.0, "Linear warm-up from lr / warmup_steps to lr, then cosine decay; set per step.")
    label_smoothing: float = option(0.1, "For both the verb and the noun cross-entropy.")
    batch_size: int = option(100, "Effective batch: segments per optimiser step (capped at the train set's size).")
    micro_batch_size: int = option(
        100, "Segments per forward/backward; gradients of batch_size / micro_batch_size micro-batches are accumulated "
        "before each step (lower it when a GPU runs out of memory)."
    )
    cutmix_alpha: float = option(1.0, "Beta(alpha, alpha) of time-span CutMix in feature space; 0 turns it off.")
    patience: int = option(
        10, "Early stopping: stop after this many epochs without a better validation action top-1 (0: never stop "
        "early)."
    )
    # --- evaluation
    eval_batch_size: int = option(500, "Segments per forward pass during validation.")
    # --- how to run (these do not change what is learned, except through floating-point order)
    seed: int = option(0, "Seeds model init, dropout, shuffling, row sampling and CutMix.")
    deterministic: bool = option(False, "Deterministic kernels for the run (bit-exact CPU resume).")
    device: str = option("auto", "auto | cpu | cuda | cuda:N.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", "What the temporal head computes in (explicit casts, fp32 master weights; fp16 with loss scaling); "
        "auto: bf16 on a GPU and on a CPU with native bf16 (AMX / AVX512-BF16), else fp32. The resolved value is "
        "recorded in the run's config and used by its validation and by evaluate."
    )
    progress: bool = option(True, "Rich progress bars, per-epoch lines and the summary table.")

    def __post_init__(self) -> None:
        positive = ("frames", "hidden", "layers", "width", "depth", "attention_heads", "queries", "context_frames",
                    "epochs", "batch_size", "micro_batch_size", "eval_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.head not in HEADS:
            raise ConfigError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.width % self.attention_heads:
            raise ConfigError(f"attention_heads ({self.attention_heads}) must divide width ({self.width})")
        if self.context_seconds < 0:
            raise ConfigError(f"context_seconds must be >= 0, got {self.context_seconds}")
        if not all(0 <= getattr(self, name) < 1 for name in ("dropout", "lstm_dropout", "attention_dropout")):
            raise ConfigError("dropout, lstm_dropout and attention_dropout must be in [0, 1)")
        if self.train_splits not in ("train", "train+validation"):
            raise ConfigError(f"train_splits must be 'train' or 'train+validation', got {self.train_splits!r}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_epochs < 0 or self.patience < 0 or self.cutmix_alpha < 0 or self.weight_decay < 0:
            raise ConfigError("warmup_epochs, patience, cutmix_alpha and weight_decay must be >= 0")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass(frozen=True)
class ScoringConfig:
    checkpoints: tuple[Path, ...] = option(
        (), 'A train-temporal best.pt; repeat the option to ensemble several models.', flag="--checkpoint"
    )
    ensemble_weights: tuple[float, ...] | None = option(
        None, 'One weight per --checkpoint, in order (normalised). Default: equal weights.', flag="--ensemble-weight"
    )
    ensemble_mode: Literal["probs", "logits"] = option("probs", "Average probabilities (stored as log) or logits.")
    annotations: Path | None = option(None, "Folder with EPIC_100_*.csv.")
    cache: Path = option(Path("cache"), "Folder of feature sets.")
    feature_set: str | None = option(None, "Key under cache (or path); None: the checkpoints' own feature set.")
    pack_cache: bool = option(
        True, "Read the packed split from <cache>/.packed/<feature set>/ (written by train-temporal or an earlier "
        "evaluate) instead of re-reading Zarr; packed and kept there when absent."
    )
    batch_size: int = option(500, "Segments per forward pass.")
    device: str = option("auto", "auto | cpu | cuda | cuda:N.")
    precision: Literal["checkpoint", "fp32", "bf16", "fp16"] = option(
        "checkpoint", "What each model's head computes in; checkpoint: the precision it was trained and validated in "
        "(its config's)."
    )
    progress: bool = option(True, "Progress bars and the summary table.")

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.ensemble_mode not in ("probs", "logits"):
            raise ConfigError(f"ensemble_mode must be 'probs' or 'logits', got {self.ensemble_mode!r}")
        if self.ensemble_weights is not None and len(self.ensemble_weights) != len(self.checkpoints):
            raise ConfigError(f"ensemble_weights has {len(self.ensemble_weights)} values for "
                              f"{len(self.checkpoints)} checkpoints; give one weight per --checkpoint")


@dataclass(frozen=True)
class EvaluateConfig(ScoringConfig):
    split: Literal["validation", "train"] = option("validation", "A labelled split.")
    out: Path = option(
        Path("runs/evaluate"), "Folder for metrics.json, metrics.md, results_<split>.pkl, per_class.csv and plots."
    )
    allow_missing: bool = option(
        False, "Score only the segments whose videos are in the feature set (metrics then cover a subset and are not "
        "comparable with the leaderboard; the count is reported)."
    )
    top_confused: int = option(10, "Most confused (true, predicted) pairs listed and plotted per task.")


@dataclass(frozen=True)
class SubmitConfig(ScoringConfig):
    out: Path = option(Path("runs/submit"), "Folder for submission.zip, results_test.pkl and config.yaml.")
    sls_pt: int | None = option(None, "Pretraining level; None: from the feature set's weights (random 0, ImageNet 1).")
    sls_tl: int = option(SLS_TL_FULL_TEMPORAL, "Training labels: 3 = full temporal supervision (start/stop + classes).")
    sls_td: int | None = option(None, "Training data; None: from the checkpoints (3 = train, 4 = train+validation).")


@dataclass(frozen=True)
class FinetuneConfig:
    # --- where to start
    checkpoint: Path | None = option(None, "best.pt or last.pt of a train-temporal (or finetune) run.")
    weights: str | None = option(
        None, "Backbone weights the checkpoint's feature set was extracted with: imagenet | imagenet1k_v1 | random | "
        "PATH; None: read from the feature set's identity (a file needs its path here). Whatever is given must hash to "
        "the feature set's weights_sha, else the run is refused."
    )
    # --- data
    videos: Path | None = option(None, "Video root (<root>/P01/P01_01.MP4 or <root>/P01/videos/P01_01.MP4).")
    annotations: Path | None = option(None, "Folder with EPIC_100_*.csv.")
    train_file: str = option("EPIC_100_train.csv", "Train CSV in the annotations folder.")
    cache: Path = option(
        Path("cache"), "Folder of feature sets: clips are decoded at the stored rows' times of the checkpoint's "
        "feature set (stage two's frames)."
    )
    feature_set: str | None = option(
        None, "Key under --cache (or path) of the checkpoint's feature set; None: the checkpoint's own key."
    )
    train_splits: Literal["train", "train+validation"] = option(
        "train", "train: validate and stop early; train+validation: no validation, no early stop."
    )
    out: Path = option(Path("runs/finetune"), "This run's folder: checkpoints, metrics.csv, plots, config.yaml.")
    resume: bool = option(False, "Continue the run in --out from its last.pt.")
    frames: int | None = option(None, "T frames per clip; None: the checkpoint's T.")
    # --- what trains
    trainable_stages: int = option(2, "Last ResNet stages (layer4, layer3, ...) that train: 0-4, 5 adds the stem.")
    activation_checkpointing: bool = option(False, "Recompute trainable stages in backward: less memory, ~30% slower.")
    # --- augmentation (the seed's; identical for all T frames of a clip)
    crop_scale: tuple[float, float] = option(
        (0.6, 1.0), "RandomResizedCrop area range (output: the feature set's crop)."
    )
    hflip: float = option(0.5, "Probability of a horizontal flip (the same for every frame of a clip).")
    color_jitter: tuple[float, float, float, float] = option(
        (0.3, 0.3, 0.2, 0.1), "Brightness, contrast, saturation, hue."
    )
    grayscale: float = option(0.1, "Probability of turning a clip grayscale.")
    cutmix_alpha: float = option(1.0, "CutMix with one box for the whole clip; 0 turns it off.")
    # --- optimisation
    epochs: int = option(10, "Maximum epochs (the LR schedule spans all of them).")
    lr: float = option(1.5e-4, "Peak AdamW lr of the temporal model and heads.")
    backbone_lr: float = option(1.5e-5, "Peak AdamW lr of the trainable backbone stages.")
    min_lr: float = option(0.0, "Head lr at the end of the cosine (the backbone's scales with backbone_lr / lr).")
    weight_decay: float = option(1e-4, "AdamW (decoupled) weight decay.")
    warmup_epochs: float = option(1.0, "Linear warm-up epochs, then cosine decay; set per step.")
    label_smoothing: float = option(0.1, "For both the verb and the noun cross-entropy.")
    batch_size: int = option(32, "Effective (global) batch: clips per optimiser step over all processes.")
    micro_batch_size: int = option(8, "Clips per forward/backward in each process; gradients accumulate.")
    patience: int = option(3, "Early stopping on validation action top-1 (0: never).")
    # --- evaluation
    eval_batch_size: int = option(8, "Clips per forward pass during validation.")
    eval_start: bool = option(True, "Evaluate the starting model first (its metrics are the baseline to beat).")
    restandardize: bool = option(
        True, "Re-estimate the temporal model's input mean/std with the training backbone after every epoch (the head "
        "keeps seeing standardised features)."
    )
    stats_segments: int = option(
        512, "Train segments (evenly spaced, bin-centre frames, centre crop) the re-estimated mean/std are measured "
        "on."
    )
    # --- how to run
    num_workers: int = option(8, "DataLoader decode processes per training process (0: decode in the main process).")
    decode_threads: int = option(
        0, "Codec threads per decode process; 0: this process's cores / num_workers, so threads x workers stays within "
        "the cores."
    )
    seed: int = option(0, "Seeds init, augmentation, shuffling and CutMix.")
    deterministic: bool = option(False, "Deterministic kernels for the run (bit-exact CPU resume).")
    device: str = option("auto", "auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK).")
    precision: Literal["fp32", "bf16"] = option(
        "bf16", "What a GPU computes in: the encoder under autocast, the LSTM by explicit casts (a CPU computes in "
        "fp32); the run's config records what it computed in."
    )
    progress: bool = option(True, "Progress bars, per-stage lines and the summary table.")

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "micro_batch_size", "eval_batch_size", "stats_segments"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.frames is not None and self.frames < 1:
            raise ConfigError(f"frames must be >= 1, got {self.frames}")
        if not 0 <= self.trainable_stages <= 5:
            raise ConfigError(
                f"trainable_stages must be 0..5 (4 ResNet stages, 5 adds the stem), got {self.trainable_stages}"
            )
        if self.lr <= 0 or self.backbone_lr < 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(
                f"need lr > 0, backbone_lr >= 0, 0 <= min_lr <= lr; got {self.lr}, {self.backbone_lr}, {self.min_lr}"
            )
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {self.crop_scale}")
        if not (0 <= self.hflip <= 1 and 0 <= self.grayscale <= 1):
            raise ConfigError("hflip and grayscale are probabilities in [0, 1]")
        if min(self.color_jitter) < 0 or self.color_jitter[3] > 0.5:
            raise ConfigError(f"color_jitter must be >= 0 with hue <= 0.5, got {self.color_jitter}")
        if self.warmup_epochs < 0 or self.patience < 0 or self.cutmix_alpha < 0 or self.weight_decay < 0:
            raise ConfigError("warmup_epochs, patience, cutmix_alpha and weight_decay must be >= 0")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.decode_threads < 0:
            raise ConfigError(f"decode_threads must be >= 0, got {self.decode_threads}")


@dataclass(frozen=True)
class PredictConfig:
    source: str = option(
        "",
        "Video file, or a camera: index N (Linux: /dev/videoN via v4l2), a /dev/videoN path, or any FFmpeg input "
        "with --camera-format (e.g. --camera-format lavfi \"testsrc2=size=640x360:rate=30,realtime\", a synthetic "
        "camera)."
    )
    checkpoint: Path | None = option(None, "best.pt or last.pt of a train-temporal run.")
    weights: str | None = option(
        None, "Backbone weights; they must hash to the checkpoint's. Default: derived from the feature set (imagenet, "
        "random with its seed, or a finetune checkpoint's own backbone); other files: give the path."
    )
    seed: int = option(0, "Seed of --weights random.")
    stride: int = option(4, "Sampled frames between predictions (1: a prediction for every frame).")
    window_seconds: float = option(
        2.0, "Seconds of stream each prediction sees; its T rows are sampled from them exactly as evaluate samples a "
        "segment of that length (bin centres), so a prediction equals evaluate's score for the segment [window_start, "
        "window_end). Default 2.0 s: the median EPIC-100 validation segment (1.96 s over 9,668 segments; 51 % are "
        "shorter, 24 % more than twice as long). Use T / fps (1.6 at T=16, 10 fps) for T consecutive rows."
    )
    skip_frames: int = option(0, "Sampled frames dropped after each kept one: backbone runs at fps / (skip + 1).")
    top_k: int = option(5, "Verbs, nouns and actions listed per prediction.")
    timeline: Path | None = option(
        None, "Write the timeline of predictions to this .csv or .jsonl (JSON Lines) file, one line per prediction, "
        "flushed as it is made: the file is valid at any moment and a run that stops keeps every prediction so far."
    )
    video_out: Path | None = option(
        None, "Write an annotated MP4: the sampled source frames at their own size, the model's crop outlined, the "
        "latest prediction drawn on them (needs Pillow)."
    )
    max_seconds: float | None = option(
        None, "Stop after this many seconds of source (a camera otherwise runs until Ctrl-C)."
    )
    batch_size: int | None = option(
        None, "Frames per backbone call. Default: for a file, the feature set's extract batch size (up to 64; short "
        "batches are padded as extract pads them, so features equal the stored ones bit for bit); for a camera 1, the "
        "lowest latency. A camera keeps at most this many captured frames waiting: when the model falls behind, the "
        "oldest are dropped (counted in the summary) rather than queued."
    )
    device: str = option("auto", "auto | cpu | cuda | cuda:N.")
    precision: Literal["fp32", "bf16", "fp16"] | None = option(
        None, "Backbone compute precision. Default: the feature set's (what the model was trained on)."
    )
    channels_last: bool = option(True, "Channels-last memory layout for the backbone (faster convolutions).")
    compile: bool = option(False, "torch.compile the backbone (pays off on long GPU runs).")
    camera_format: str | None = option(
        None, "PyAV capture format for cameras (v4l2, avfoundation, dshow, or lavfi for FFmpeg's synthetic sources, "
        "which --source then describes). Default: v4l2 on Linux, avfoundation on macOS."
    )
    progress: bool = option(True, "Progress bars, per-stage lines and the summary table.")


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: Path | None = option(None, "best.pt or last.pt of a train-temporal run.")
    format: ExportFormat = option(
        "onnx", "Model format to write. torchscript: the full model in the feature set's precision (equals predict); "
        "onnx, coreml: fp32 (no bf16 convolutions there). coreml converts on Linux; its numeric parity can only be "
        "checked on macOS."
    )
    out: Path = option(Path("exported"), "Folder for the two models and classes.json.")
    weights: str | None = option(
        None, "Backbone weights of the full model. Default: derived from the feature set, as predict does."
    )
    seed: int = option(0, "Seed of --weights random.")
    opset: int = option(18, "ONNX opset (the dynamo exporter needs >= 18).")
    check: bool = option(True, "Run each export on random inputs and compare with PyTorch.")
    seed_inputs: int = option(0, "Seed of the random check inputs.")


@dataclass(frozen=True)
class DemoConfig:
    out: Path = option(Path("demo_out"), "Folder for everything: data/, cache/, runs/, config.yaml.")
    seed: int = option(0, "Seeds the dataset, the random backbone and training.")
    dataset: Literal["default", "tiny"] = option(
        "default", "default: 18 videos, 6 min of video; tiny: 6 videos of about 4 s (tests)."
    )
    source: Literal["video", "frames"] = option(
        "video", "Extract from the videos, or from their official JPEG frames (folders and tars, generated too)."
    )
    # --- stage one (features): random weights, the seed's 10 rows/s, smaller crops than ImageNet's 224
    fps: float = option(10.0, "Feature rows per second of video.")
    resize: int = option(128, "Shorter side before the centre crop (ImageNet uses 256).")
    crop: int = option(112, "Centre crop size (ImageNet uses 224).")
    precision: Precision = option(
        "fp32", "Backbone compute precision; bf16 is faster on CPUs with native bf16, fp32 runs everywhere."
    )
    # --- stage two (temporal models): the recipe, shrunk to a few hundred segments
    frames: tuple[int, ...] = option(
        (1, 16, 32),
        "Rows per segment of each temporal model (1: a single-frame baseline); the ensemble uses the others."
    )
    hidden: int = option(128, "LSTM units per direction.")
    epochs: int = option(30, "Maximum epochs of each temporal model.")
    batch_size: int = option(16, "Segments per optimiser step.")
    lr: float = option(1.0e-3, "Peak AdamW learning rate.")
    warmup_epochs: float = option(2.0, "Linear warm-up epochs, then cosine decay.")
    device: str = option("auto", "auto | cpu | cuda | cuda:N.")
    progress: bool = option(True, "Progress bars, per-stage lines and the summary table.")

    def __post_init__(self) -> None:
        if not self.frames or min(self.frames) < 1:
            raise ConfigError(f"frames must list positive sequence lengths, got {self.frames}")


@dataclass(frozen=True)
class CacheConfig:
    cache: Path = option(Path("cache"), "Folder holding one subfolder per feature set.")
    feature_set: str | None = option(
        None, 'Only this feature set: its key (folder name under --cache) or its folder.', flag="--set"
    )


@dataclass(frozen=True)
class CacheExportConfig(CacheConfig):
    out: Path | None = option(None, "The file to write, e.g. features.h5.")
    format: Literal["hdf5"] = option("hdf5", "Output format.")
