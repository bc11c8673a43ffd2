"""`--backbone`: timm image models through the whole pipeline at their own feature width, resnet50 unchanged, and
clear answers to bad names, a missing timm, weights of the wrong shape and no internet."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision

from epicfeat.backbone import (RESNET50, TimmFeatures, WeightsError, canonical_backbone, create_backbone,
                               pretrained_data_config)
from epicfeat.configs import ExtractConfig
from epicfeat.encoder import build_encoder, create_encoder
from epicfeat.extract import decode_settings, extract_features, resolved
from epicfeat.frames import Preprocess, iter_frames
from epicfeat.store import FeatureStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
RESNET18 = "timm:resnet18"
VIT = "timm:vit_tiny_patch16_224"
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def epicfeat(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    return subprocess.run(["epicfeat", *map(str, args)], capture_output=True, text=True, env=env or CHILD_ENV)


def _extract(dataset, cache: Path, backbone: str, **overrides) -> FeatureStore:
    values = dict(split="all", videos=dataset.videos, annotations=dataset.annotations, cache=cache, backbone=backbone,
                  weights="random", crop=32, fps=10.0, precision="fp32", batch_size=16, decode_workers=0,
                  device="cpu", progress=False)
    summary = extract_features(ExtractConfig(**{**values, **overrides}))
    assert summary.ok
    return FeatureStore.open(summary.store)


# ------------------------------------------------------------------------------------- names and preprocessing
def test_timm_names_are_canonical_and_their_preprocessing_comes_from_the_pretrained_config():
    assert canonical_backbone(RESNET50) == RESNET50
    assert canonical_backbone(RESNET18) == "timm:resnet18.a1_in1k"  # timm's default tag, written out
    assert canonical_backbone("timm:resnet18.tv_in1k") == "timm:resnet18.tv_in1k"
    config = resolved(ExtractConfig(backbone=VIT, weights="random", crop=64), CPU)
    assert config.backbone == "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    assert (config.mean, config.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # not ImageNet's: the model's own
    assert config.resize == 71 and config.fold_bn is False  # floor(64 / crop_pct 0.9); never folded
    defaults = resolved(ExtractConfig(backbone="timm:resnet18.tv_in1k", weights="random"), CPU)
    assert (defaults.crop, defaults.resize) == (224, 256)  # input size 224, crop_pct 0.875
    seed = resolved(ExtractConfig(weights="random"), CPU)  # resnet50: the seed's preprocessing
    assert (seed.resize, seed.crop, seed.mean, seed.std, seed.fold_bn) == (256, 224, (0.485, 0.456, 0.406),
                                                                            (0.229, 0.224, 0.225), True)
    assert pretrained_data_config(RESNET50)["interpolation"] == "bilinear"


def test_the_decoder_resizes_with_the_interpolation_the_pretrained_weights_were_trained_on():
    """resnet18.a1_in1k's recipe resizes bicubically, tv_in1k's bilinearly: the identity records which."""
    assert resolved(ExtractConfig(backbone=RESNET18, weights="pretrained"), CPU).interpolation == "bicubic"
    assert resolved(ExtractConfig(backbone="timm:resnet18.tv_in1k", weights="pretrained"), CPU).interpolation == \
        "bilinear"
    assert resolved(ExtractConfig(weights="random"), CPU).interpolation == "bilinear"  # resnet50: the seed's


def test_a_bicubic_feature_set_resizes_bicubically_everywhere(synthetic_dataset, tmp_path):
    """extract records bicubic in the identity and the attrs; the encoder's preprocessing (predict, export,
    finetune) reads it back; the rows are the model's on bicubically resized frames, not bilinear ones."""
    store = _extract(synthetic_dataset, tmp_path, RESNET18, video_ids=("P01_01",), split="train")
    assert store.identity.interpolation == "bicubic"
    assert store.video_attrs("P01_01")["preprocess"]["interpolation"] == "swscale_bicubic"
    preprocess = Preprocess.from_identity(store.identity.to_dict())
    assert preprocess.interpolation == "bicubic"
    bilinear = Preprocess(resize=preprocess.resize, crop=preprocess.crop)
    path = synthetic_dataset.videos / "P01" / "P01_01.MP4"
    bicubic_images = next(iter_frames(path, preprocess=preprocess, fps=10.0, batch_size=4)).images
    bilinear_images = next(iter_frames(path, preprocess=bilinear, fps=10.0, batch_size=4)).images
    assert not np.array_equal(bicubic_images, bilinear_images)


# ---------------------------------------------------------------------------------- the features themselves
def test_resnet50_features_are_torchvision_s_resnet50_bit_for_bit(synthetic_dataset, tmp_path):
    """The default backbone computes exactly torchvision's resnet50 (fc dropped) on the decoded frames."""
    store = _extract(synthetic_dataset, tmp_path, RESNET50, fold_bn=False, video_ids=("P01_01",), split="train")
    assert store.identity.backbone == RESNET50 and store.identity.feature_dim == 2048
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        resnet = torchvision.models.resnet50().eval()
    resnet.fc = torch.nn.Identity()
    _assert_rows_equal_the_model(store, synthetic_dataset, resnet.to(memory_format=torch.channels_last))


@pytest.mark.parametrize("backbone, width", [(RESNET18, 512), (VIT, 192)])
def test_timm_rows_are_the_model_s_pooled_pre_logits_at_its_width(synthetic_dataset, tmp_path, backbone, width):
    store = _extract(synthetic_dataset, tmp_path, backbone, video_ids=("P01_01",), split="train")
    assert store.identity.feature_dim == width and store.read("P01_01").features.shape[1] == width
    name = store.identity.backbone[len("timm:"):]
    kwargs = {"img_size": 32} if backbone == VIT else {}  # a ViT is built for its input size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=0, **kwargs).eval()
    _assert_rows_equal_the_model(store, synthetic_dataset, model.to(memory_format=torch.channels_last))
    encoder = create_encoder(store.identity.to_dict(), CPU)  # what predict, export and finetune build
    assert isinstance(encoder.backbone, TimmFeatures) and encoder.num_features == width


def _assert_rows_equal_the_model(store: FeatureStore, dataset, model: torch.nn.Module) -> None:
    identity = store.identity
    preprocess = Preprocess.from_identity(identity.to_dict())
    video = next(dataset.videos.rglob("P01_01.*"))
    images = np.concatenate([b.images for b in iter_frames(video, fps=10.0, preprocess=preprocess, batch_size=999)])
    pixels = torch.zeros((identity.batch_size, 3, identity.crop, identity.crop))  # (B, 3, crop, crop): a padded batch
    pixels[:4] = torch.from_numpy(images[:4]).permute(0, 3, 1, 2).float()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in (identity.mean, identity.std))
    pixels = ((pixels - mean) * (1.0 / std)).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        direct = model(pixels)[:4].numpy().astype(np.float16)  # (4, D)
    np.testing.assert_array_equal(np.asarray(store.read("P01_01").features[:4]), direct)


# ------------------------------------------------------------------- any width through the commands after it
def _train_and_evaluate(dataset, tmp_path: Path, *, width: int) -> Path:
    """train-temporal and evaluate on the one feature set under tmp_path/cache (console script): its best.pt, whose
    head reads rows of ``width``."""
    data = ["--annotations", dataset.annotations, "--cache", tmp_path / "cache"]
    trained = epicfeat("train-temporal", *data, "--out", tmp_path / "run", "--frames", 4, "--hidden", 8, "--epochs",
                       1, "--batch-size", 8, "--micro-batch-size", 8, "--device", "cpu", "--no-progress")
    assert trained.returncode == 0, trained.stderr
    checkpoint = tmp_path / "run" / "best.pt"
    assert torch.load(checkpoint, weights_only=False)["model_args"]["input_dim"] == width
    evaluated = epicfeat("evaluate", *data, "--checkpoint", checkpoint, "--out", tmp_path / "eval", "--device", "cpu",
                         "--no-progress")
    assert evaluated.returncode == 0, evaluated.stderr
    assert (tmp_path / "eval" / "metrics.json").is_file()
    return checkpoint


def test_a_vit_feature_set_runs_through_train_evaluate_predict_and_export(synthetic_dataset, tmp_path):
    """192-d rows: train-temporal, evaluate, predict and export follow the stored width (console script)."""
    store = _extract(synthetic_dataset, tmp_path / "cache", VIT)
    checkpoint = _train_and_evaluate(synthetic_dataset, tmp_path, width=192)
    video = next(synthetic_dataset.videos.rglob("P01_01.*"))
    predicted = epicfeat("predict", video, "--checkpoint", checkpoint, "--timeline",
                         tmp_path / "timeline.jsonl", "--max-seconds", 2, "--device", "cpu", "--no-progress")
    assert predicted.returncode == 0, predicted.stderr
    assert (tmp_path / "timeline.jsonl").read_text().count("\n") >= 1
    exported = epicfeat("export", "--checkpoint", checkpoint, "--format", "torchscript", "--out", tmp_path / "ts")
    assert exported.returncode == 0, exported.stderr
    assert store.identity.feature_dim == 192


def test_a_checkpoint_is_refused_on_another_backbone_s_cache_naming_both(synthetic_dataset, tmp_path):
    vit = _extract(synthetic_dataset, tmp_path / "cache", VIT)
    resnet = _extract(synthetic_dataset, tmp_path / "cache", RESNET18)
    data = ["--annotations", synthetic_dataset.annotations, "--cache", tmp_path / "cache"]
    trained = epicfeat("train-temporal", *data, "--feature-set", vit.path.name, "--out", tmp_path / "run",
                       "--frames", 2, "--hidden", 8, "--epochs", 1, "--batch-size", 8, "--micro-batch-size", 8,
                       "--device", "cpu", "--no-progress")
    assert trained.returncode == 0, trained.stderr
    refused = epicfeat("evaluate", *data, "--feature-set", resnet.path.name, "--checkpoint", tmp_path / "run/best.pt",
                       "--out", tmp_path / "eval", "--device", "cpu", "--no-progress")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "timm-vit_tiny_patch16_224" in refused.stderr and "timm-resnet18" in refused.stderr


def test_finetune_trains_a_timm_image_backbone_that_extract_then_loads(synthetic_dataset, tmp_path):
    """512-d resnet18 through the console script: finetune (checkpointed) trains its last coarse groups with frozen
    batch-norm statistics, and `extract --weights best.pt --backbone` caches the features best.pt pairs with."""
    from epicfeat.temporal.checkpoint import check_feature_set, load_checkpoint

    resnet18 = "timm:resnet18.tv_in1k"
    store = _extract(synthetic_dataset, tmp_path / "cache", resnet18, crop=64, fold_bn=False)
    data = ["--annotations", synthetic_dataset.annotations, "--cache", tmp_path / "cache"]
    trained = epicfeat("train-temporal", *data, "--out", tmp_path / "run", "--frames", 2, "--hidden", 8, "--epochs",
                       1, "--batch-size", 8, "--micro-batch-size", 8, "--device", "cpu", "--no-progress")
    assert trained.returncode == 0, trained.stderr
    tuned = epicfeat("finetune", *data, "--checkpoint", tmp_path / "run/best.pt", "--videos", synthetic_dataset.videos,
                     "--out", tmp_path / "ft", "--epochs", 1, "--batch-size", 4, "--micro-batch-size", 2,
                     "--num-workers", 0, "--trainable-stages", 2, "--activation-checkpointing", "--lr", "1e-3",
                     "--backbone-lr", "1e-3", "--warmup-epochs", 0, "--no-eval-start", "--device", "cpu",
                     "--no-progress")
    assert tuned.returncode == 0, tuned.stderr
    before = create_backbone("random", backbone=resnet18, seed=0).state_dict()
    after = torch.load(tmp_path / "ft/best.pt", map_location="cpu", weights_only=True)["backbone"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("model.layer4.") for k in changed) and any(k.startswith("model.layer3.") for k in changed)
    assert not any(k.startswith(("model.conv1.", "model.bn1.", "model.layer1.", "model.layer2.")) for k in changed)
    assert not any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)

    again = epicfeat("extract", "--backbone", resnet18, "--weights", tmp_path / "ft/best.pt", "--split", "validation",
                     "--videos", synthetic_dataset.videos, "--annotations", synthetic_dataset.annotations, "--cache",
                     tmp_path / "cache", "--crop", 64, "--fps", 10, "--precision", "fp32", "--batch-size", 16,
                     "--decode-workers", 0, "--device", "cpu", "--no-progress")
    assert again.returncode == 0, again.stderr
    checkpoint = load_checkpoint(tmp_path / "ft/best.pt")
    (fine_tuned,) = [s for s in FeatureStore.list_sets(tmp_path / "cache") if s.path != store.path]
    assert fine_tuned.identity.weights_sha == checkpoint.feature_set["weights_sha"] != store.identity.weights_sha
    assert fine_tuned.identity.feature_dim == 512
    check_feature_set(checkpoint, fine_tuned.identity)  # best.pt pairs with the features of its own backbone


def test_a_timm_backbone_trains_every_parameter_and_checkpoints_to_the_same_gradients():
    """A ViT's coarse groups hold its pos_embed and cls_token too; grad checkpointing changes no gradient."""
    from epicfeat.finetune import ClipModel
    from epicfeat.temporal.model import TemporalModelArgs, create_temporal_model

    identity = {"fold_bn": False, "mean": (0.5,) * 3, "std": (0.5,) * 3, "precision": "fp32", "channels_last": False,
                "compile": False}
    clips = torch.rand(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255  # (B, T, 3, H, W)
    grads = []
    for checkpointing in (False, True):
        encoder = build_encoder(create_backbone("random", backbone=VIT, crop=32), identity, CPU, trainable=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same head both times
            temporal = create_temporal_model(TemporalModelArgs(input_dim=192, frames=2, n_verbs=3, n_nouns=4,
                                                               hidden=4, layers=1, dropout=0.0))
        stages = len(encoder.backbone.stages())
        model = ClipModel(encoder, temporal, trainable_stages=stages).train()
        model.encoder.set_grad_checkpointing(checkpointing)
        verbs, nouns = model(clips)
        (verbs.sum() + nouns.sum()).backward()
        assert all(p.grad is not None for p in model.encoder.parameters())  # pos_embed and cls_token included
        grads.append([p.grad.clone() for p in model.encoder.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_finetune_refuses_a_backbone_it_cannot_train_in_one_line(synthetic_dataset, tmp_path):
    """A checkpoint of a video backbone's features (a future torchvision:...) is refused before anything loads."""
    _extract(synthetic_dataset, tmp_path / "cache", RESNET18)
    data = ["--annotations", synthetic_dataset.annotations, "--cache", tmp_path / "cache"]
    trained = epicfeat("train-temporal", *data, "--out", tmp_path / "run", "--frames", 2, "--hidden", 8, "--epochs",
                       1, "--batch-size", 8, "--micro-batch-size", 8, "--device", "cpu", "--no-progress")
    assert trained.returncode == 0, trained.stderr
    payload = torch.load(tmp_path / "run/best.pt", map_location="cpu", weights_only=False)
    payload["feature_set"]["backbone"] = "torchvision:r2plus1d_18"
    torch.save(payload, tmp_path / "video.pt")
    refused = epicfeat("finetune", *data, "--checkpoint", tmp_path / "video.pt", "--videos", synthetic_dataset.videos,
                       "--out", tmp_path / "ft", "--device", "cpu", "--no-progress")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "torchvision:r2plus1d_18 features; finetune trains image backbones only" in " ".join(refused.stderr.split())


# ---------------------------------------------------------------------------------------------- bad input
def test_an_unknown_name_lists_close_matches(tmp_path):
    for name, match in (("timm:vit_tiny_patch16_2244", "timm:vit_tiny_patch16_224"),
                        ("timm:convnext_tinny", "convnext_tiny"), ("resnet5", "resnet50")):
        done = epicfeat("extract", "--backbone", name, "--video-ids", "P01_01", "--videos", tmp_path)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert "close matches" in done.stderr and match in done.stderr, done.stderr


def test_an_unknown_pretrained_tag_lists_the_model_s_tags():
    with pytest.raises(Exception, match="no pretrained tag 'bogus' for vit_tiny_patch16_224; its tags: "
                                        "vit_tiny_patch16_224.augreg_in21k, vit_tiny_patch16_224.augreg_in21k_ft_in1k"):
        canonical_backbone("timm:vit_tiny_patch16_224.bogus")


def test_a_missing_timm_names_the_package_to_install(tmp_path):
    shadow = tmp_path / "no_timm" / "timm"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'timm'\")\n")
    env = {**CHILD_ENV, "PYTHONPATH": os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", "")])}
    done = epicfeat("extract", "--backbone", RESNET18, "--weights", "random", "--video-ids", "P01_01", "--videos",
                    tmp_path, "--cache", tmp_path / "cache", env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "needs the timm package" in done.stderr and "pip install timm" in done.stderr


def test_weights_of_the_wrong_shape_name_both_shapes(synthetic_dataset, tmp_path):
    from safetensors.torch import save_file

    vit_small = tmp_path / "vit_small.safetensors"  # a ViT-S (384-d) file given for a ViT-Ti (192-d)
    save_file(timm.create_model("vit_small_patch16_224").state_dict(), vit_small)
    shapes = r"patch_embed.proj.weight \(384, 3, 16, 16\) \(expected \(192, 3, 16, 16\)\)"
    with pytest.raises(WeightsError, match=shapes):
        create_backbone(vit_small, backbone=VIT)
    wide = tmp_path / "wide_resnet50_2.pt"  # ResNet50's keys, twice the inner widths
    torch.save(timm.create_model("wide_resnet50_2").state_dict(), wide)
    done = epicfeat("extract", "--backbone", "timm:resnet50.tv_in1k", "--weights", wide, "--video-ids", "P01_01",
                    "--videos", synthetic_dataset.videos, "--cache", tmp_path / "cache", "--no-progress")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    message = " ".join(done.stderr.split())
    assert "with the wrong shape: layer1.0.conv1.weight (128, 64, 1, 1) (expected (64, 64, 1, 1))" in message


def test_weights_from_a_file_load_and_an_exported_state_dict_round_trips(tmp_path):
    random = create_backbone("random", backbone=RESNET18, seed=3)
    path = tmp_path / "resnet18.safetensors"
    from safetensors.torch import save_file

    full = timm.create_model("resnet18")  # with its classifier, as timm's files hold it: fc.* is ignored
    full.load_state_dict({**random.model.state_dict(), "fc.weight": full.fc.weight, "fc.bias": full.fc.bias})
    save_file(full.state_dict(), path)
    loaded = create_backbone(path, backbone=RESNET18)
    assert loaded.weights_sha == random.weights_sha and loaded.weights_name == f"sha-{random.weights_sha[:12]}"


def test_offline_pretrained_weights_say_which_file_to_fetch_and_where(tmp_path):
    env = {**CHILD_ENV, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "th")}
    done = epicfeat("extract", "--backbone", "timm:resnet18.tv_in1k", "--weights", "pretrained", "--video-ids",
                    "P01_01", "--videos", tmp_path, "--cache", tmp_path / "cache", env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    message = " ".join(done.stderr.split())
    assert "hf download timm/resnet18.tv_in1k model.safetensors" in message
    assert str(tmp_path / "hf" / "hub" / "models--timm--resnet18.tv_in1k") in message
    assert "https://huggingface.co/timm/resnet18.tv_in1k/resolve/main/model.safetensors" in message


# ------------------------------------------------------------------------------------------ video backbones
R2PLUS1D = "torchvision:r2plus1d_18"


def test_video_backbone_rows_are_clips_centred_at_10_fps_each_the_model_on_its_16_frames(synthetic_dataset,
                                                                                        tmp_path):
    """torchvision:r2plus1d_18: rows at --fps 10, each the pooled 512-d features of 16 frames at 15 fps centred at
    the row's pts; the span each row saw is stored, a second for whole clips; the video decoded at 15 fps once."""
    store = _extract(synthetic_dataset, tmp_path, R2PLUS1D, video_ids=("P01_01",), split="train", batch_size=4)
    identity = store.identity
    assert (identity.backbone, identity.feature_dim, identity.clip_len, identity.clip_fps) == (R2PLUS1D, 512, 16, 15.0)
    assert (identity.crop, identity.resize, identity.channels_last) == (32, 36, False)  # 36 = floor(32 / (112/128))
    video = store.read("P01_01")
    preprocess = Preprocess.from_identity(identity.to_dict())
    path = next(synthetic_dataset.videos.rglob("P01_01.*"))
    frames = [b for b in iter_frames(path, fps=15.0, preprocess=preprocess, batch_size=999)]
    images, pts = np.concatenate([b.images for b in frames]), np.concatenate([b.pts for b in frames])
    image_rows = np.concatenate([b.pts for b in iter_frames(path, fps=10.0, preprocess=preprocess, batch_size=999)])
    assert video.rows == len(image_rows)  # one row per 0.1 s, as image backbones give
    np.testing.assert_allclose(video.pts, image_rows, atol=1 / 15)  # each centred at the clip frame nearest its time
    span = np.asarray(video.span[:])
    assert np.all((span[:, 0] <= video.pts) & (video.pts <= span[:, 1]))
    interior = (span[:, 0] > 0) & (span[:, 1] < pts[-1])
    np.testing.assert_allclose(span[interior, 1] - span[interior, 0], 15 / 15, rtol=2e-3)  # 16 frames at ~15 fps
    # Row 10 (interior): the model on the 16 decoded frames of its span, in a padded batch as extract runs it.
    first = int(np.searchsorted(pts, span[10, 0]))
    assert interior[10] and pts[first + 8] == video.pts[10] and pts[first + 15] == span[10, 1]  # 8 before, 7 after
    clip = torch.from_numpy(images[first:first + 16]).permute(0, 3, 1, 2).float()  # (16, 3, crop, crop)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in (identity.mean, identity.std))
    clips = torch.zeros((4, 16, 3, 32, 32))
    clips[0] = (clip - mean) * (1.0 / std)
    model = create_backbone("random", backbone=R2PLUS1D, seed=0)
    with torch.inference_mode():
        direct = model(clips)[0].numpy().astype(np.float16)  # (512,)
    np.testing.assert_allclose(np.asarray(video.features[10]).astype(np.float32), direct.astype(np.float32),
                               rtol=1e-2, atol=1e-3)


def test_a_video_backbone_needs_a_row_rate_and_decodes_every_frame_its_clips_and_rows_need():
    with pytest.raises(Exception, match=r"--fps: torchvision:r2plus1d_18's rows are clips of 16 frames"):
        resolved(ExtractConfig(backbone=R2PLUS1D, weights="random", fps=None), CPU)
    assert decode_settings(ExtractConfig(backbone=R2PLUS1D, weights="random", fps=10.0), 0).fps == 15.0
    assert decode_settings(ExtractConfig(backbone=R2PLUS1D, weights="random", fps=30.0), 0).fps == 30.0
    mvit = ExtractConfig(backbone="torchvision:mvit_v2_s", weights="random", fps=10.0)
    assert decode_settings(mvit, 0).fps == 15.0  # 7.5-fps clips, rows at 10 per second: every second frame


def test_a_video_backbone_through_the_console_script_extract_train_evaluate_and_the_commands_that_refuse_it(
        synthetic_dataset, tmp_path):
    """`extract --backbone torchvision:r2plus1d_18` caches 512-d clip rows that train-temporal and evaluate use as
    any rows; predict makes the same clip rows from a video file; export takes clips; finetune and predict's
    annotated video (image backbones) refuse it in one line."""
    data = ["--annotations", synthetic_dataset.annotations, "--cache", tmp_path / "cache"]
    extracted = epicfeat("extract", "--backbone", R2PLUS1D, "--weights", "random", "--split", "all", "--videos",
                         synthetic_dataset.videos, *data, "--crop", 32, "--fps", 10, "--precision", "fp32",
                         "--batch-size", 8, "--decode-workers", 1, "--device", "cpu", "--no-progress")
    assert extracted.returncode == 0, extracted.stderr
    checkpoint = _train_and_evaluate(synthetic_dataset, tmp_path, width=512)
    video = next(synthetic_dataset.videos.rglob("P01_01.*"))
    predicted = epicfeat("predict", video, "--checkpoint", checkpoint, "--timeline", tmp_path / "timeline.jsonl",
                         "--stride", 1, "--device", "cpu", "--no-progress")
    assert predicted.returncode == 0, predicted.stderr
    stored = FeatureStore.open(next((tmp_path / "cache").iterdir())).read("P01_01")
    timeline = [json.loads(line) for line in (tmp_path / "timeline.jsonl").read_text().splitlines()]
    predictions = [r for r in timeline if r.get("type") == "prediction"]
    assert timeline[-1]["frames"] == stored.rows  # the summary: as many rows as extract stored
    # predict's rows are extract's: the same centres, the last (its clip padded at the video's end) included
    assert predictions and {p["frame_index"] for p in predictions} <= set(stored.frame_indices.tolist())
    assert predictions[-1]["frame_index"] == stored.frame_indices[-1] and predictions[-1]["time"] == stored.pts[-1]
    exported = epicfeat("export", "--checkpoint", checkpoint, "--format", "torchscript", "--out", tmp_path / "ts")
    assert exported.returncode == 0, exported.stderr
    classes = json.loads((tmp_path / "ts" / "classes.json").read_text())
    assert classes["inputs"]["full_model"]["shape"] == [1, 4, 16, 3, 32, 32]  # 4 rows, each a 16-frame clip
    assert [c["matches_predict"] for c in classes["checks"]] == [True, True]
    for command in (["predict", video, "--checkpoint", checkpoint, "--video-out", tmp_path / "out.mp4", "--device",
                     "cpu", "--no-progress"],
                    ["finetune", *data, "--checkpoint", checkpoint, "--videos", synthetic_dataset.videos, "--out",
                     tmp_path / "ft", "--device", "cpu", "--no-progress"]):
        refused = epicfeat(*command)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert R2PLUS1D in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
