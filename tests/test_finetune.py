"""End-to-end fine-tuning on decoded clips: sampling, augmentation, one epoch, resume, DDP, re-extraction, damage."""
import dataclasses
import os
import types
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pathlib import Path

from test_train_temporal import killed_after_epoch

from epicfeat.backbone import WeightsError, create_backbone, weights_name_of_sha
from epicfeat.clips import (
    ClipAugment,
    SegmentRows,
    decode_clip,
    decode_threads,
    global_positions,
    load_clip_data,
    sample_step_cutmix,
    segment_rows,
)
from epicfeat.configs import FinetuneConfig
from epicfeat.data.annotations import EpicAnnotations
from epicfeat.devices import PRECISION_DTYPES
from epicfeat.encoder import create_encoder
from epicfeat.extract import ExtractConfig, extract_features
from epicfeat.finetune import (
    DRIFT_MIN_STD,
    ClipModel,
    FinetuneError,
    World,
    _paste_cutmix,
    _StepClips,
    evaluate_clips,
    finetune,
    follow_feature_drift,
    judge,
    load_start,
)
from epicfeat.frames import Preprocess
from epicfeat.store import FeatureStore
from epicfeat.temporal.checkpoint import check_feature_set, load_checkpoint
from epicfeat.temporal.data import Context, PackedSplit, pack_split
from epicfeat.temporal.train import TrainTemporalConfig, load_training_data, score_split, train_temporal

FRAMES = 4
RESIZE, CROP = 72, 64  # tiny frames: a ResNet50 step on 64x64 clips takes well under a second on one core


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _extract(dataset, cache, split, weights="random"):
    # fold_bn=False: finetune trains torchvision's unfolded modules, so the cached features are then exactly what its
    # own backbone computes at the start, and these tests see training dynamics rather than rounding (stage two's
    # 30 epochs at lr 1e-2 on 7 validation segments turn a one-ulp difference into another trajectory).
    return extract_features(ExtractConfig(
        split=split, videos=dataset.videos, annotations=dataset.annotations, cache=cache, weights=weights,
        resize=RESIZE, crop=CROP, precision="fp32", fold_bn=False, decode_workers=0, device="cpu", progress=False,
    ))


@pytest.fixture(scope="module")
def stage_two(synthetic_dataset, tmp_path_factory):
    """The real pipeline up to stage two: extract train + validation features, train a small BiLSTM on them."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("stage_two")
    for split in ("train", "validation"):
        assert _extract(synthetic_dataset, root / "cache", split).ok
    # dropout 0: a 2-process run can then equal a 1-process one exactly (dropout masks depend on the process)
    result = train_temporal(TrainTemporalConfig(
        annotations=synthetic_dataset.annotations, cache=root / "cache", out=root / "temporal", frames=FRAMES,
        hidden=16, layers=1, lstm_dropout=0.0, dropout=0.0, epochs=30, lr=1e-2, warmup_epochs=1, batch_size=4,
        micro_batch_size=4, patience=0, device="cpu", precision="fp32", progress=False,
    ))  # fp32 on every CPU kind: finetune computes in fp32 on a CPU, so its epoch 0 equals evaluate's scores exactly
    return root, result.best_checkpoint


def _config(dataset, checkpoint, out, **overrides) -> FinetuneConfig:
    cache = Path(checkpoint).parent.parent / "cache" if checkpoint is not None else Path("cache")  # stage_two's
    small = dict(checkpoint=checkpoint, videos=dataset.videos, annotations=dataset.annotations, out=out, epochs=1,
                 cache=cache,
                 batch_size=4, micro_batch_size=2, eval_batch_size=8, num_workers=0, device="cpu", progress=False,
                 lr=1e-4, backbone_lr=1e-4, warmup_epochs=0, trainable_stages=1)  # layer4 only: faster
    return FinetuneConfig(**{**small, **overrides})


def _backbone_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["backbone"]


def _encoder(checkpoint_path):
    """The trainable frame encoder of the checkpoint's feature set (random-seed0, batch norms unfolded), on the CPU."""
    return create_encoder(load_checkpoint(checkpoint_path).feature_set, torch.device("cpu"), trainable=True)


def _pixels(*shape) -> torch.Tensor:
    """Random pixel values 0..255 of ``shape`` (what decoding and augmentation give the encoder)."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0)) * 255


# ------------------------------------------------------------------------------------------ clip sampling
@pytest.mark.parametrize("count", [1, 3, 4, 7, 16, 33])
def test_clip_rows_use_the_bins_of_stage_two(count):
    """Offsets land on the rows PackedSplit.sample_rows picks for a segment of `count` rows (same draws)."""
    split = PackedSplit(features=torch.zeros(count, 1), row_start=torch.tensor([0]), row_count=torch.tensor([count]),
                        verb_labels=None, noun_labels=None, narration_ids=["a"], participant_ids=["P01"],
                        video_ids=["P01_01"], summary={}, feature_set={})
    pts = 2.0 + np.arange(count) * 0.1 + 0.0167  # irregular stored times: whatever they are, they are used as is
    rows = SegmentRows(times=pts, start=np.array([0]), count=np.array([count]))
    for train in (False, True):
        expected = split.sample_rows(torch.tensor([0]), FRAMES, train=train, generator=torch.Generator().manual_seed(5))
        times = rows.clip_times(0, FRAMES, train=train, generator=torch.Generator().manual_seed(5))
        np.testing.assert_array_equal(times, pts[expected[0].numpy()])


def test_clip_times_with_context_are_the_rows_stage_two_reads_around_each_segment(synthetic_dataset, stage_two):
    """A head trained with context: a clip's K + T + K times are the stored rows stage two gathers for the segment
    and its context (same bins, same draws)."""
    root, checkpoint_path = stage_two
    store = load_start(_config(synthetic_dataset, checkpoint_path, root / "unused")).store
    segments = EpicAnnotations(synthetic_dataset.annotations).segments("validation")
    context = Context(0.7, 2)
    kept, rows, dropped = segment_rows(store, segments, context)
    packed = pack_split(store, segments, context=context, progress=False)
    assert dropped == 0 and len(kept) == len(packed) and packed.context_before.min() > 0
    for s, video_id in enumerate(kept["video_id"]):
        video = store.read(video_id)
        for train in (False, True):
            times = rows.clip_times(s, FRAMES, train=train, generator=torch.Generator().manual_seed(s))  # (L,)
            expected = packed.gather(torch.tensor([s]), FRAMES, train=train,
                                     generator=torch.Generator().manual_seed(s))[0]  # (L, D)
            assert times.shape == (2 + FRAMES + 2,)
            read = np.searchsorted(np.asarray(video.pts), times)  # the stored rows at those times
            np.testing.assert_array_equal(np.asarray(video.features[:])[read], expected.numpy())


def test_clip_frames_are_the_stored_rows_of_stage_two_at_59_94_fps(synthetic_dataset, stage_two):
    """Issue 15: the nominal grid k / fps put other rows into segments starting between k / fps and row k's pts."""
    root, checkpoint_path = stage_two
    store = load_start(_config(synthetic_dataset, checkpoint_path, root / "unused")).store
    annotations = EpicAnnotations(synthetic_dataset.annotations)
    videos = annotations.segments("validation")
    video_id = next(v for v in sorted(videos["video_id"].unique())
                    if abs(store.read(v).attrs.get("source_fps", 0) - 60000 / 1001) < 1e-3)
    pts = store.read(video_id).pts  # (rows,) at 10 rows/s from 59.94 fps: pts >= k / 10, up to 16.7 ms later
    late = np.flatnonzero(pts - np.arange(len(pts)) / 10 > 0.002)  # row k = frame 6k at 6k * 1001 / 60000 s
    assert len(late) and late[0] + 8 < len(pts), pts  # the finding's premise: rows later than the nominal grid
    k = int(late[0])
    start_sec = (k / 10 + pts[k]) / 2  # after the nominal k / fps, before row k's frame
    segments = pd.DataFrame({"narration_id": ["x"], "participant_id": [video_id.split("_")[0]],
                             "video_id": [video_id], "start_sec": [start_sec], "stop_sec": [start_sec + 0.8],
                             "verb_class": [0], "noun_class": [0]})
    kept, rows, dropped = segment_rows(store, segments)
    assert dropped == 0 and len(kept) == 1
    nominal_first = np.ceil(start_sec * 10 - 1e-9) / 10  # the old grid's first time: (k + 1) / 10, row k + 1
    assert nominal_first == pytest.approx((k + 1) / 10)
    # Stage two joins by the stored pts: row k (pts[k] > start_sec) is the segment's first row, the grid skipped it
    packed = pack_split(store, segments, progress=False)
    stored = np.asarray(store.read(video_id).features[:])  # (rows, 2048)
    np.testing.assert_array_equal(packed.features[0].numpy(), stored[k])
    assert rows.count[0] == int(packed.row_count[0])
    np.testing.assert_array_equal(rows.times[:rows.count[0]], pts[k:k + rows.count[0]])
    # and decoding those times gives the frames whose features were stored: same backbone, same numbers
    encoder = load_start(_config(synthetic_dataset, checkpoint_path, root / "unused")).encoder
    times = rows.clip_times(0, FRAMES, train=False, generator=None)
    images = decode_clip(next(synthetic_dataset.videos.rglob(f"{video_id}.*")), times, Preprocess(resize=RESIZE,
                                                                                                  crop=CROP))
    with torch.no_grad():
        features = encoder(torch.from_numpy(images).permute(0, 3, 1, 2))  # (T, H, W, 3) -> (T, 2048)
    rows_read = [int(np.flatnonzero(pts == t)[0]) for t in times]
    np.testing.assert_allclose(features.numpy(), stored[rows_read].astype(np.float32), rtol=2e-3, atol=2e-3)


def test_a_clip_decoded_with_a_seek_per_run_of_times_equals_one_front_to_back_pass(synthetic_dataset):
    """Long segments: times further apart than seek_gap are reached by a seek each, with the same frames."""
    video = sorted(synthetic_dataset.videos.rglob("*.MP4"))[0]
    times = np.array([3.2, 0.05, 1.1, 1.15, 2.5, 0.0])  # unordered, two close together
    decode = Preprocess(resize=RESIZE, crop=CROP)
    one_pass = decode_clip(video, times, decode, seek_gap=1e9)  # (6, CROP, CROP, 3)
    for gap in (0.01, 0.5):
        np.testing.assert_array_equal(decode_clip(video, times, decode, seek_gap=gap, threads=1), one_pass)


def test_decode_threads_times_workers_stay_within_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: 2 processes on this node share its 16 cores
    assert decode_threads(FinetuneConfig(num_workers=4)) == 2  # 4 workers x 2 threads = 8 cores per process
    assert decode_threads(FinetuneConfig(num_workers=0)) == 8  # decoding in the process itself
    assert decode_threads(FinetuneConfig(num_workers=32)) == 1
    assert decode_threads(FinetuneConfig(num_workers=4, decode_threads=3)) == 3


def test_augmentation_is_identical_across_the_frames_of_a_clip():
    augment = ClipAugment(CROP)
    frame = torch.randint(0, 256, (1, RESIZE, RESIZE, 3), dtype=torch.uint8)
    clip = frame.expand(6, -1, -1, -1).contiguous()  # (T, H, W, 3): six copies of one frame
    outputs = []
    for seed in range(12):
        out = augment(clip, seed)  # (T, 3, CROP, CROP) uint8 pixels: the encoder normalises
        assert out.shape == (6, 3, CROP, CROP) and out.dtype == torch.uint8
        assert torch.equal(out, out[:1].expand_as(out)), f"frames differ after augmentation (seed {seed})"
        outputs.append(out[0])
    assert torch.equal(augment(clip, 3)[0], outputs[3])  # reproducible from the clip's seed
    assert len({o.float().sum().item() for o in outputs}) == 12  # and different seeds draw different parameters
    # Any grayscale draw gives equal R, G, B: with p=1 every clip is gray.
    gray = ClipAugment(CROP, grayscale=1.0)(clip, 0)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    # Identity settings give the (full) decoded frame itself, which the encoder then normalises as extract does.
    plain = ClipAugment(RESIZE, scale=(1.0, 1.0), hflip=0.0, color_jitter=(0, 0, 0, 0), grayscale=0.0)
    assert torch.equal(plain(clip, 0), clip.permute(0, 3, 1, 2))


def test_step_cutmix_is_one_draw_per_global_step_whatever_the_processes():
    """Every process draws the same partners and box from the step's seed; its clips sit at j * world + r."""
    valid = torch.tensor([True, True, False, True, True, True])  # (B,) the global batch
    for seed in range(10):
        mixes = [sample_step_cutmix(valid, 20, 30, 1.0, seed) for _ in range(2)]  # two processes, one draw
        if mixes[0] is None:
            continue
        assert torch.equal(mixes[0].partner, mixes[1].partner) and mixes[0].box == mixes[1].box
        assert mixes[0].partner[2] == 2 and set(mixes[0].partner[valid].tolist()) == {0, 1, 3, 4, 5}
    assert global_positions(3, 0, 2).tolist() == [0, 2, 4] and global_positions(3, 1, 2).tolist() == [1, 3, 5]
    assert global_positions(6, 0, 1).tolist() == list(range(6))


def test_clip_cutmix_pastes_one_box_into_every_frame_and_mixes_by_area():
    """A training step's CutMix (one process): the partner's box in every frame, its labels weighed by the area."""
    pixels = torch.arange(3, dtype=torch.uint8).view(3, 1, 1, 1, 1).expand(3, 4, 3, 24, 24)  # clip i is all i
    world = World(rank=0, size=1, device=torch.device("cpu"))
    for seed in range(20):
        clips = _StepClips(pixels=pixels.clone(), valid=torch.ones(3, dtype=torch.bool), verbs=torch.arange(3),
                           nouns=torch.arange(3))
        _paste_cutmix(clips, 1.0, seed, world)
        if clips.partner_verbs is None:
            continue
        for i, partner in enumerate(clips.partner_verbs.tolist()):  # clip i's partner (labels = clip numbers)
            from_partner = clips.pixels[i] == partner
            if partner != i:
                share = from_partner[0, 0].float().mean().item()
                assert share == pytest.approx(clips.fraction)  # the label weight is the pasted area
            assert torch.equal(from_partner, from_partner[:1].expand_as(from_partner))  # same box in all frames
    one_valid = torch.tensor([True, False, False])
    assert sample_step_cutmix(torch.ones(3, dtype=torch.bool), 20, 30, 0.0, 0) is None
    assert sample_step_cutmix(one_valid, 20, 30, 1.0, 0) is None


# --------------------------------------------------------------------------------------------- the model
def test_decoded_clips_reproduce_the_stage_two_model_on_stored_features(synthetic_dataset, stage_two):
    """Bin-centre frames + extract's preprocessing + the start backbone give the features stage two trained on."""
    root, checkpoint_path = stage_two
    config = _config(synthetic_dataset, checkpoint_path, root / "unused", frames=FRAMES)
    start = load_start(config)
    checkpoint = load_checkpoint(checkpoint_path)
    data = load_training_data(TrainTemporalConfig(annotations=synthetic_dataset.annotations, cache=root / "cache",
                                                  progress=False))
    with torch.no_grad():
        stored_verbs, stored_nouns = score_split(checkpoint.create_model(), data.validation, frames=FRAMES,
                                                 batch_size=100, device=torch.device("cpu"))  # (S, Cv), (S, Cn)
    clips = load_clip_data(config, checkpoint.card, start.store, start.preprocess).validation
    batch = torch.utils.data.default_collate([clips[i] for i in range(len(clips))])
    assert batch["valid"].all()
    model = ClipModel(start.encoder, checkpoint.create_model(), trainable_stages=2).eval()
    with torch.no_grad():
        verbs, nouns = model(batch["clip"].permute(0, 1, 4, 2, 3))  # (S, T, H, W, 3) -> (S, Cv), (S, Cn)
    # Stored features are float16: the logits agree to its rounding.
    np.testing.assert_allclose(verbs.numpy(), stored_verbs.numpy(), atol=2e-3)
    np.testing.assert_allclose(nouns.numpy(), stored_nouns.numpy(), atol=2e-3)


def test_activation_checkpointing_gives_the_same_gradients(stage_two):
    _, checkpoint_path = stage_two
    checkpoint = load_checkpoint(checkpoint_path)
    clips = _pixels(2, FRAMES, 3, CROP, CROP)
    grads = []
    for checkpointing in (False, True):
        model = ClipModel(_encoder(checkpoint_path), checkpoint.create_model(), trainable_stages=5).train()
        model.encoder.set_grad_checkpointing(checkpointing)  # the encoder's option, not a rebuilt forward
        verbs, nouns = model(clips)
        (verbs.sum() + nouns.sum()).backward()
        grads.append([p.grad.clone() for p in model.encoder.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@dataclasses.dataclass
class _Segments:
    """What scoring reads of a validation ClipDataset: the segments' labels and participants."""

    verbs: np.ndarray
    nouns: np.ndarray
    participants: list[str]

    def __len__(self) -> int:
        return len(self.verbs)


def test_validation_copies_the_logits_to_the_host_once_whatever_the_number_of_batches(stage_two, monkeypatch):
    """On a GPU each copy of a device tensor to the host waits for the GPU: validation keeps the logits of every
    batch where the model ran and copies them in one ``cpu()``. Counted on the CPU by wrapping Tensor.cpu."""
    _, checkpoint_path = stage_two
    model = ClipModel(_encoder(checkpoint_path), load_checkpoint(checkpoint_path).create_model(), trainable_stages=0)
    world = World(rank=0, size=1, device=torch.device("cpu"))
    copies = []
    cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: copies.append(self.shape) or cpu(self, *a, **k))

    def validation_copies(batches: int) -> list:
        clips = torch.randint(0, 256, (2 * batches, FRAMES, CROP, CROP, 3), generator=torch.Generator().manual_seed(0),
                              dtype=torch.uint8)  # (S, T, H, W, 3) as decoded
        loader = [{"clip": clips[2 * b:2 * b + 2], "valid": torch.tensor([True, b > 0]),
                   "index": torch.arange(2 * b, 2 * b + 2)} for b in range(batches)]  # the first batch: one skipped
        labels = np.arange(2 * batches) % 2
        data = types.SimpleNamespace(validation=_Segments(verbs=labels, nouns=labels, participants=["P01"] * len(labels)),
                                     unseen_participants=None, tail_verbs=None, tail_nouns=None)
        copies.clear()
        metrics = evaluate_clips(model, loader, data, world)
        assert metrics["val_skipped"] == 1 and np.isfinite(metrics["val_loss"])
        return list(copies)

    assert len(validation_copies(2)) == len(validation_copies(5)) == 1  # 2 batches or 5: one copy of the logits


# -------------------------------------------------------------------------------------------- precision
def _recording_dtypes(model: ClipModel) -> list[tuple[str, bool, torch.dtype, torch.dtype]]:
    """Every forward of the model's ResNet50 stage 4 and LSTM, as (part, training?, input dtype, computed dtype)."""
    seen = []
    model.encoder.backbone.layer4.register_forward_hook(
        lambda layer, inputs, output: seen.append(("backbone", layer.training, inputs[0].dtype, output.dtype)))
    model.temporal.lstm[0].register_forward_pre_hook(
        lambda lstm, inputs: seen.append(("lstm", lstm.training, inputs[0].dtype, lstm.weight_ih_l0.dtype)))
    model.temporal.verb_head.register_forward_pre_hook(
        lambda head, inputs: seen.append(("head", head.training, inputs[0].dtype, head.weight.dtype)))
    return seen


def test_bf16_means_a_bf16_lstm_and_a_bf16_backbone_even_inside_an_fp16_autocast(stage_two):
    """CUDA autocast runs cuDNN RNNs in float16: under bf16 finetune trained its LSTM in fp16, without loss scaling.
    The clip model now casts as stage two does (autocast for the backbone only, explicit casts for the LSTM). A CPU
    autocast to float16 around it stands in for CUDA's: the LSTM still computes in bfloat16, the heads in fp32."""
    _, checkpoint_path = stage_two
    model = ClipModel(_encoder(checkpoint_path), load_checkpoint(checkpoint_path).create_model(),
                      trainable_stages=1).train()
    model.set_precision("bf16")
    seen = _recording_dtypes(model)
    with torch.autocast("cpu", dtype=torch.float16):
        verbs, nouns = model(_pixels(2, FRAMES, 3, CROP, CROP))
    (verbs.sum() + nouns.sum()).backward()
    bf16 = torch.bfloat16
    assert seen == [("backbone", True, bf16, bf16), ("lstm", True, bf16, bf16), ("head", True, torch.float32,
                                                                                 torch.float32)]
    assert verbs.dtype == torch.float32 and torch.isfinite(verbs).all()
    assert model.temporal.lstm[0].weight_ih_l0.grad.dtype == torch.float32  # fp32 master weights
    assert model.encoder.backbone.layer4[0].conv1.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_run_records_the_precision_its_lstm_computed_in(synthetic_dataset, stage_two, tmp_path, monkeypatch,
                                                          precision):
    """What a checkpoint records is what evaluate and predict run its LSTM in, so it must be what finetune trained
    and validated in: on a CPU that is fp32 whatever --precision says (FinetuneConfig.precision), bf16 on a GPU
    (tests/test_cuda.py)."""
    import epicfeat.finetune as finetune_module

    seen = []

    def recording_clip_model(*args, **kwargs):
        model = ClipModel(*args, **kwargs)
        seen.append(_recording_dtypes(model))
        return model

    monkeypatch.setattr(finetune_module, "ClipModel", recording_clip_model)
    _, checkpoint_path = stage_two
    result = finetune(_config(synthetic_dataset, checkpoint_path, tmp_path / "ft", precision=precision,
                              eval_start=False, restandardize=False, trainable_stages=0))
    recorded = load_checkpoint(result.last_checkpoint).config["precision"]
    assert recorded == "fp32"  # the CPU computes in fp32
    dtype = PRECISION_DTYPES[recorded]
    (calls,) = seen
    assert {call for call in calls if call[0] == "lstm"} == {("lstm", True, dtype, dtype),
                                                            ("lstm", False, dtype, dtype)}


# ------------------------------------------------------------------------------------------------- runs
def test_one_epoch_from_a_stage_two_checkpoint_changes_the_backbone(synthetic_dataset, stage_two, tmp_path):
    """Through the CLI: trains the last two stages only, keeps BN statistics, writes readable checkpoints."""
    from typer.testing import CliRunner

    from epicfeat.cli import app
    from epicfeat.cli import commands  # noqa: F401  (registers the commands)

    _, checkpoint_path = stage_two
    out = tmp_path / "ft"
    args = ["finetune", "--checkpoint", str(checkpoint_path), "--videos", str(synthetic_dataset.videos),
            "--annotations", str(synthetic_dataset.annotations), "--out", str(out), "--epochs", "2",
            "--batch-size", "4", "--micro-batch-size", "2", "--num-workers", "0", "--device", "cpu",
            "--lr", "1e-4", "--backbone-lr", "1e-5", "--trainable-stages", "2", "--no-progress",
            "--cache", str(checkpoint_path.parent.parent / "cache")]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for name in ("best.pt", "last.pt", "metrics.csv", "config.yaml", "loss.png", "accuracy.png", "lr.png"):
        assert (out / name).is_file(), name

    before = create_backbone("random", seed=0).state_dict()
    after = _backbone_state(out / "last.pt")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("layer4.") and k.endswith("conv1.weight") for k in changed)
    assert any(k.startswith("layer3.") for k in changed)
    assert not any(k.startswith(("conv1.", "bn1.", "layer1.", "layer2.")) for k in changed)  # frozen stages
    assert not any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)  # frozen BN

    checkpoint = load_checkpoint(out / "last.pt")  # the temporal part reads like any stage-two checkpoint
    assert checkpoint.epoch == 2 and len(checkpoint.history) == 2
    assert checkpoint.config["frames"] == FRAMES and checkpoint.config["trainable_stages"] == 2
    backbone = create_backbone(str(out / "last.pt"))  # and the backbone drops back into stage one
    assert backbone.weights_name == weights_name_of_sha(backbone.weights_sha)  # named by content, not "last.pt"
    start_sha = load_checkpoint(checkpoint_path).feature_set["weights_sha"]
    assert backbone.weights_sha == checkpoint.feature_set["weights_sha"] != start_sha
    assert not torch.equal(checkpoint.model_state["verb_head.weight"],
                           load_checkpoint(checkpoint_path).model_state["verb_head.weight"])
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and "all_action_accuracy_at_1" in rows[0] and "train_skipped" in rows[0]

    # Fine-tuning does not lower validation action accuracy compared with its starting checkpoint.
    payload = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    start_metrics = payload["finetune"]["start_metrics"]
    best = load_checkpoint(out / "best.pt").metrics
    assert start_metrics["all_action_accuracy_at_1"] == pytest.approx(
        load_checkpoint(checkpoint_path).metrics["all_action_accuracy_at_1"])  # same numbers as stage two's
    assert best["all_action_accuracy_at_1"] >= start_metrics["all_action_accuracy_at_1"]


def test_resume_is_exact_and_independent_of_decode_workers(synthetic_dataset, stage_two, tmp_path):
    _, checkpoint_path = stage_two
    whole = finetune(_config(synthetic_dataset, checkpoint_path, tmp_path / "whole", epochs=2, num_workers=2,
                             eval_start=False))
    killed = _config(synthetic_dataset, checkpoint_path, tmp_path / "killed", epochs=2, eval_start=False)
    with killed_after_epoch(1):
        finetune(killed)
    resumed = finetune(dataclasses.replace(killed, resume=True))
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    for a, b in zip(whole.history, resumed.history):
        for key in a:
            if not key.endswith(("seconds", "_per_s")) and not (isinstance(a[key], float) and np.isnan(a[key])):
                assert a[key] == b[key], key
    for name in ("last.pt",):
        x = torch.load(tmp_path / "whole" / name, weights_only=True)
        y = torch.load(tmp_path / "killed" / name, weights_only=True)
        for part in ("backbone", "model"):
            for key in x[part]:
                assert torch.equal(x[part][key], y[part][key]), f"{part}.{key}"
    with pytest.raises(FinetuneError, match="already holds a run"):
        finetune(killed)
    with pytest.raises(FinetuneError, match="config differs"):
        finetune(dataclasses.replace(killed, resume=True, backbone_lr=1e-3))


def _torchrun(dataset, checkpoint_path, out, settings, *extra):
    """`epicfeat finetune` in 2 gloo processes under torchrun, with _config's settings plus ``settings``."""
    config_file = out.parent / f"{out.name}.yaml"
    config_file.write_text(yaml.safe_dump({**settings, "eval_batch_size": 8, "lr": 1e-4, "backbone_lr": 1e-4,
                                           "trainable_stages": 1, "warmup_epochs": 0}))  # as in _config
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "epicfeat", "finetune", "--config", str(config_file), "--checkpoint", str(checkpoint_path),
               "--videos", str(dataset.videos), "--annotations", str(dataset.annotations), "--out", str(out),
               "--num-workers", "0", "--device", "cpu", "--no-progress",
               "--cache", str(checkpoint_path.parent.parent / "cache"), *extra]
    run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def _assert_same_run(one_path, two_path, steps: int):
    """Two runs' last.pt agree up to float summation order (the all-reduce adds in another order)."""
    one = torch.load(one_path, weights_only=True)
    two = torch.load(two_path, weights_only=True)
    for key, value in one["model"].items():  # the temporal model
        torch.testing.assert_close(two["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    start = create_backbone("random", seed=0).state_dict()
    moved = differ = total = 0
    for key, value in one["backbone"].items():
        if not value.dtype.is_floating_point:
            continue
        # Adam divides by sqrt(v): for the rare weights whose gradient is ~0, summation-order noise in the
        # all-reduce becomes a full-size step. So: nearly every weight equal, none further apart than the steps.
        gap = (two["backbone"][key] - value).abs()
        assert gap.max() <= 2 * 1e-4 * steps + 1e-7, key  # lr 1e-4
        differ += int((gap > 1e-6).sum())
        total += value.numel()
        moved += int((value != start[key]).sum())
    assert moved > 1_000_000 and differ / total < 1e-3, (moved, differ, total)
    assert [r["epoch"] for r in one["history"]] == [r["epoch"] for r in two["history"]]
    for row_one, row_two in zip(one["history"], two["history"]):
        for key in ("step", "train_loss", "val_loss", "all_action_accuracy_at_1", "all_verb_accuracy_at_5"):
            assert row_two[key] == pytest.approx(row_one[key], rel=1e-4), key


def test_two_gloo_processes_equal_one_with_the_same_global_batch(synthetic_dataset, stage_two, tmp_path):
    """torchrun, 2 CPU processes x 2 clips = 1 process x 4 clips per step, CutMix on (issue 15: partners were drawn
    per process and micro-batch; now per global step over the global batch, boxes all-gathered)."""
    _, checkpoint_path = stage_two
    # restandardize off here: a = std / reference_std of near-constant dimensions turns the all-reduce's
    # summation-order noise into buffer differences above _assert_same_run's tolerances
    settings = dict(cutmix_alpha=1.0, epochs=1, eval_start=False, batch_size=4, micro_batch_size=2,
                    restandardize=False)
    finetune(_config(synthetic_dataset, checkpoint_path, tmp_path / "one", **settings))
    _torchrun(synthetic_dataset, checkpoint_path, tmp_path / "two", settings)
    _assert_same_run(tmp_path / "one" / "last.pt", tmp_path / "two" / "last.pt", steps=2)  # 8 clips / 4


def test_a_ddp_run_resumes_where_a_run_stopped(synthetic_dataset, stage_two, tmp_path):
    """Epoch 1 in one process, epoch 2 resumed by 2 torchrun processes == both epochs in one process."""
    _, checkpoint_path = stage_two
    settings = dict(cutmix_alpha=0.0, epochs=2, eval_start=False, batch_size=4, micro_batch_size=2,
                    restandardize=False)
    finetune(_config(synthetic_dataset, checkpoint_path, tmp_path / "one", **settings))
    with killed_after_epoch(1):
        finetune(_config(synthetic_dataset, checkpoint_path, tmp_path / "two", **settings))
    _torchrun(synthetic_dataset, checkpoint_path, tmp_path / "two", settings, "--resume")
    _assert_same_run(tmp_path / "one" / "last.pt", tmp_path / "two" / "last.pt", steps=2)  # epoch 2 only differs


def test_re_extraction_with_the_fine_tuned_backbone_is_a_separate_feature_set(synthetic_dataset, stage_two, tmp_path):
    root, checkpoint_path = stage_two
    out = tmp_path / "ft"
    finetune(_config(synthetic_dataset, checkpoint_path, out, eval_start=False))
    cache = tmp_path / "cache"
    original = _extract(synthetic_dataset, cache, "validation")
    tuned = _extract(synthetic_dataset, cache, "validation", weights=str(out / "best.pt"))
    assert original.ok and tuned.ok and tuned.store != original.store
    assert len(FeatureStore.list_sets(cache)) == 2
    identity = FeatureStore.open(tuned.store).identity
    checkpoint = load_checkpoint(out / "best.pt")
    assert identity.weights == checkpoint.feature_set["weights"] == weights_name_of_sha(identity.weights_sha)
    assert identity.weights_sha == checkpoint.feature_set["weights_sha"]
    check_feature_set(checkpoint, identity)  # the fine-tuned model pairs with its own features...
    with pytest.raises(Exception, match="differ in: weights, weights_sha"):
        check_feature_set(checkpoint, FeatureStore.open(original.store).identity)  # ...and not with the old ones
    # Paired by content: last.pt (the same backbone as best.pt here) and a renamed copy give the same feature set.
    renamed = tmp_path / "copies" / "my-model.pt"
    renamed.parent.mkdir()
    shutil.copy(out / "best.pt", renamed)
    for weights in (out / "last.pt", renamed):
        again = _extract(synthetic_dataset, cache, "validation", weights=str(weights))
        assert again.ok and again.store == tuned.store
        check_feature_set(load_checkpoint(weights), FeatureStore.open(again.store).identity)
    assert len(FeatureStore.list_sets(cache)) == 2
    video = FeatureStore.open(original.store).complete_videos()[0]
    old = np.asarray(FeatureStore.open(original.store).read(video).features[:])
    new = np.asarray(FeatureStore.open(tuned.store).read(video).features[:])
    assert old.shape == new.shape and not np.array_equal(old, new)


def test_damaged_and_missing_videos_are_skipped_and_counted(synthetic_dataset, stage_two, tmp_path):
    _, checkpoint_path = stage_two
    videos = tmp_path / "videos"
    shutil.copytree(synthetic_dataset.videos, videos)
    annotations = EpicAnnotations(synthetic_dataset.annotations)
    train = annotations.segments("train")
    damaged = sorted(train["video_id"].unique())[0]
    path = next(videos.rglob(f"{damaged}.*"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated: its index is gone
    validation = annotations.segments("validation")
    missing = sorted(validation["video_id"].unique())[-1]
    next(videos.rglob(f"{missing}.*")).unlink()
    result = finetune(dataclasses.replace(_config(synthetic_dataset, checkpoint_path, tmp_path / "ft", epochs=2),
                                          videos=videos))
    per_epoch = int((train["video_id"] == damaged).sum())
    assert [r["train_skipped"] for r in result.history] == [per_epoch, per_epoch]
    assert result.skipped["train"] == 2 * per_epoch
    assert result.pack_summary["validation"]["missing_video_dropped"] == int((validation["video_id"] == missing).sum())
    assert result.pack_summary["train"]["segments"] == len(train)
    assert all(np.isfinite(r["train_loss"]) for r in result.history)
    (note,) = [n for n in result.notes if "could not be decoded" in n]
    assert f"{damaged}: VideoError" in note  # which video, and why


def test_backbone_weights_other_than_the_feature_sets_are_refused(synthetic_dataset, stage_two, tmp_path):
    _, checkpoint_path = stage_two
    other = tmp_path / "other.pt"
    torch.save(create_backbone("random", seed=1).state_dict(), other)
    with pytest.raises(WeightsError, match="not the ones the features were extracted with"):
        finetune(_config(synthetic_dataset, checkpoint_path, tmp_path / "ft", weights=str(other)))
    with pytest.raises(FinetuneError, match="--checkpoint"):
        finetune(_config(synthetic_dataset, None, tmp_path / "ft"))


# ------------------------------------------------------------------------------------- baseline at epoch 0
def test_epoch_0_scores_like_evaluate_and_stays_best_when_an_epoch_is_worse(synthetic_dataset, stage_two, tmp_path):
    """Issue 15: the only epoch became best.pt even when far worse than its start. Now the start is epoch 0."""
    from epicfeat.configs import EvaluateConfig
    from epicfeat.evaluate import evaluate as evaluate_command

    root, checkpoint_path = stage_two
    scored = evaluate_command(EvaluateConfig(checkpoints=(checkpoint_path,), annotations=synthetic_dataset.annotations,
                                             cache=root / "cache", out=tmp_path / "evaluate", device="cpu",
                                             progress=False))
    # A head lr of 1 with no warm-up ruins the model in its two steps (backbone frozen: cheap on a CPU).
    out = tmp_path / "ft"
    result = finetune(_config(synthetic_dataset, checkpoint_path, out, lr=1.0, trainable_stages=0, cutmix_alpha=0.0,
                              label_smoothing=0.0))
    for key, value in scored.metrics.items():  # the same frames, the same model: the same official numbers
        if "accuracy" in key and not np.isnan(value):
            assert result.start_metrics[key] == pytest.approx(value, abs=1e-9), key
    start_action = result.start_metrics["all_action_accuracy_at_1"]
    epoch = result.history[0]
    assert epoch["val_loss"] > result.start_metrics["val_loss"] + 0.5  # the epoch got worse...
    assert epoch["all_action_accuracy_at_1"] <= start_action  # ...and did not beat the start's top-1 (a tie stays)
    assert result.best_epoch == 0 and result.gain == 0.0  # so best.pt is still the start
    assert result.verdict.startswith("fine-tuning did not help") and result.verdict in result.notes
    best, start = load_checkpoint(out / "best.pt"), load_checkpoint(checkpoint_path)
    assert best.epoch == 0 and best.metrics["all_action_accuracy_at_1"] == start_action
    for key, value in start.model_state.items():
        assert torch.equal(best.model_state[key], value), key
    start_backbone = create_backbone("random", seed=0).state_dict()
    for key, value in _backbone_state(out / "best.pt").items():
        assert torch.equal(value, start_backbone[key]), key
    assert best.feature_set == start.feature_set  # the start's own features still pair with it
    check_feature_set(best, FeatureStore.open(root / "cache" / start.feature_set_key).identity)
    assert load_checkpoint(out / "last.pt").epoch == 1  # the worse epoch is kept only as last.pt


def test_a_transformer_head_with_context_starts_where_evaluate_scores_it(synthetic_dataset, stage_two, tmp_path):
    """Another head, with context: epoch 0's clips (K + T + K decoded frames) score as evaluate scores the stored
    features; --frames must be the head's own T."""
    from epicfeat.configs import EvaluateConfig
    from epicfeat.evaluate import evaluate as evaluate_command
    from epicfeat.temporal.checkpoint import save_checkpoint
    from epicfeat.temporal.model import TemporalModelArgs, create_temporal_model

    root, checkpoint_path = stage_two
    start = load_checkpoint(checkpoint_path)
    args = TemporalModelArgs(head="transformer", input_dim=2048, frames=FRAMES, width=16, attention_heads=4,
                             context_seconds=0.7, context_frames=2, n_verbs=start.model_args.n_verbs,
                             n_nouns=start.model_args.n_nouns)
    torch.manual_seed(0)
    model = create_temporal_model(args, start.model_state["feature_mean"], start.model_state["feature_std"])
    torch.nn.init.normal_(model.context_marker)
    checkpoint = save_checkpoint(tmp_path / "transformer.pt", model=model, card=start.card, epoch=1, metrics={},
                                 history=[])
    scored = evaluate_command(EvaluateConfig(checkpoints=(checkpoint,), annotations=synthetic_dataset.annotations,
                                             cache=root / "cache", out=tmp_path / "evaluate", device="cpu",
                                             progress=False))
    with pytest.raises(FinetuneError, match=f"reads exactly {FRAMES} rows per segment"):
        finetune(_config(synthetic_dataset, checkpoint, tmp_path / "bad", frames=FRAMES + 1, cache=root / "cache"))
    result = finetune(_config(synthetic_dataset, checkpoint, tmp_path / "ft", trainable_stages=0, precision="fp32",
                              cache=root / "cache"))
    for key, value in scored.metrics.items():
        if "accuracy" in key and not np.isnan(value):
            assert result.start_metrics[key] == pytest.approx(value, abs=1e-9), key
    assert load_checkpoint(tmp_path / "ft" / "last.pt").model_args == args


def test_the_verdict_says_by_how_much_fine_tuning_helped():
    start = {"all_verb_accuracy_at_1": 50.0, "all_noun_accuracy_at_1": 40.0, "all_action_accuracy_at_1": 20.0}
    best = {"all_verb_accuracy_at_1": 55.0, "all_noun_accuracy_at_1": 40.0, "all_action_accuracy_at_1": 25.5}
    gain, verdict = judge(start, 3, best)
    assert gain == 5.5
    assert verdict == ("fine-tuning helped: validation top-1 verb 50.00 -> 55.00 (+5.00), noun 40.00 -> 40.00 "
                       "(+0.00), action 20.00 -> 25.50 (+5.50) at epoch 3")
    assert judge({}, 1, best) == (None, "")  # no baseline (--no-eval-start, or no validation): nothing to judge


# ---------------------------------------------------------------------------- features and head together
def test_feature_drift_is_followed_exactly_for_an_affine_change_and_not_at_all_without_one(stage_two):
    _, checkpoint_path = stage_two
    model = load_checkpoint(checkpoint_path).create_model()
    stored_mean, stored_std = model.feature_mean.clone(), model.feature_std.clone()
    generator = torch.Generator().manual_seed(0)
    features = stored_mean + stored_std * torch.randn(3, FRAMES, 2048, generator=generator)  # (3, T, 2048)
    reference_mean = stored_mean.double() + 0.1
    reference_std = stored_std.double().clamp(min=2 * DRIFT_MIN_STD) * 1.1  # a * std stays above the floor
    drift = {"stored_mean": stored_mean, "stored_std": stored_std, "reference_mean": reference_mean,
             "reference_std": reference_std}
    with torch.no_grad():
        expected = model(features)
        # Unchanged backbone: bit-identical statistics.
        follow_feature_drift(model, drift, reference_mean.clone(), reference_std.clone())
        assert torch.equal(model.feature_mean, stored_mean) and torch.equal(model.feature_std, stored_std)
        # Every dimension scaled by a in [0.5, 2] and shifted by b: the head sees the same standardised inputs.
        a = torch.empty(2048, dtype=torch.float64).uniform_(0.5, 2.0, generator=generator)
        b = torch.randn(2048, dtype=torch.float64, generator=generator)
        follow_feature_drift(model, drift, a * reference_mean + b, a * reference_std)
        moved = (a * features.double() + b).float()  # (3, T, 2048): the new backbone's features
        for got, want in zip(model(moved), expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        # Without following, the same drift changes the logits a lot.
        model.set_feature_stats(stored_mean, stored_std)
        assert (model(moved)[0] - expected[0]).abs().max() > 0.1  # vs < 1e-4 above: three orders of magnitude more


def test_a_small_backbone_lr_does_not_wreck_a_good_head_in_one_epoch(synthetic_dataset, stage_two, tmp_path):
    """Head lr ~0, backbone lr 1e-4 on layer4: with the stats following the features, validation holds up."""
    # The fully trained head (last.pt, epoch 30): on 7 validation segments best.pt may be an early, untrained epoch.
    checkpoint_path = stage_two[1].parent / "last.pt"
    runs = {}
    for restandardize in (False, True):
        runs[restandardize] = finetune(_config(
            synthetic_dataset, checkpoint_path, tmp_path / f"ft{int(restandardize)}", lr=1e-9, backbone_lr=1e-4,
            trainable_stages=1, cutmix_alpha=0.0, restandardize=restandardize, stats_segments=64,
        ))
    start = runs[True].start_metrics
    followed, fixed = runs[True].history[0], runs[False].history[0]
    print({k: (start[k], fixed[k], followed[k]) for k in ("val_loss", "all_action_accuracy_at_1")})
    # Measured (2 cores, this fixture, fp32): start 3.65 / 0.0 %, fixed statistics 3.75 / 0.0 %, following 3.73 /
    # 14.3 %. On the demo's default data (55 validation segments) at the default backbone lr 1.5e-5 the same one epoch
    # gave 65.5 % -> 0.0 % action top-1 with fixed statistics and 60.0 % following the drift. Seven validation
    # segments carry no finer claim than the direction; the exact mechanism is the test above.
    assert followed["all_action_accuracy_at_1"] >= start["all_action_accuracy_at_1"]
    assert followed["val_loss"] < fixed["val_loss"]


# ------------------------------------------------------------------------------------------------ the loop
@pytest.mark.slow
def test_the_loop_recipe_closes_on_synthetic_data(tmp_path):
    """pipelines/finetune_loop.sh --synthetic: stage two -> finetune -> re-extract with best.pt -> stage two."""
    import json

    recipe = Path(__file__).resolve().parent.parent / "pipelines" / "finetune_loop.sh"
    run = subprocess.run(["bash", str(recipe), "--synthetic", str(tmp_path / "loop")], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "loop" / "loop_summary.json").read_text())
    key = "all_action_accuracy_at_1"
    first, tuned, final = (summary[name] for name in ("temporal_first", "finetune", "temporal_final"))
    assert tuned[key] >= first[key]  # finetune's best.pt never falls below the model it started from
    assert final[key] >= first[key] and summary["final_at_least_as_good"]
    assert summary["keep"].endswith("temporal_final/best.pt")
    final_set = load_checkpoint(tmp_path / "loop" / "temporal_final" / "best.pt").feature_set
    assert final_set["weights"] == weights_name_of_sha(final_set["weights_sha"])  # the fine-tuned backbone's features


def test_a_feature_set_is_paired_by_its_weights_hash_not_their_name(stage_two):
    """random-seed0 re-extracted from a file holding those weights is named sha-...: the same numbers, accepted."""
    root, checkpoint_path = stage_two
    checkpoint = load_checkpoint(checkpoint_path)
    identity = FeatureStore.open(root / "cache" / checkpoint.feature_set_key).identity.to_dict()
    same = {**identity, "weights": weights_name_of_sha(identity["weights_sha"])}
    check_feature_set(checkpoint, same)
    other = create_backbone("random", seed=1)
    with pytest.raises(Exception, match="differ in: weights, weights_sha"):
        check_feature_set(checkpoint, {**identity, "weights": weights_name_of_sha(other.weights_sha),
                                       "weights_sha": other.weights_sha})
    with pytest.raises(Exception, match="differ in: crop, weights"):  # the name rule covers the weights alone
        check_feature_set(checkpoint, {**same, "crop": identity["crop"] + 1})
    # The same backbone and preprocessing over another source form (a video's official frames) is scored too;
    # anything else that differs besides is still refused.
    check_feature_set(checkpoint, {**identity, "source": "frames-epic"})
    with pytest.raises(Exception, match="differ in: crop, source"):
        check_feature_set(checkpoint, {**identity, "source": "frames-epic", "crop": identity["crop"] + 1})
