"""torchvision's Kinetics-400 video networks as backbones (torchvision:<name>): clips in, one pooled feature per clip.
Random weights, small clips, on the CPU; no network is used."""
import urllib.error

import pytest
import torch
import torchvision

from epicfeat.backbone import (BackboneError, VideoFeatures, WeightsError, canonical_backbone, create_backbone,
                               is_video, pretrained_data_config)
from epicfeat.errors import EpicfeatError

R2PLUS1D = "torchvision:r2plus1d_18"


@pytest.fixture(scope="module")
def random_seed0() -> VideoFeatures:
    return create_backbone("random", backbone=R2PLUS1D, seed=0)


@pytest.fixture(scope="module")
def clips() -> torch.Tensor:
    return torch.randn(2, 16, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # (N, T, 3, H, W)


def test_random_weights_are_seeded_leave_the_rng_alone_and_pool_one_feature_per_clip(random_seed0, clips):
    state = torch.get_rng_state()
    again = create_backbone("random", backbone=R2PLUS1D, seed=0)
    other = create_backbone("random", backbone=R2PLUS1D, seed=1)
    assert torch.equal(torch.get_rng_state(), state)

    assert isinstance(random_seed0, VideoFeatures) and not random_seed0.training
    assert (random_seed0.name, random_seed0.num_features) == (R2PLUS1D, 512)
    assert (random_seed0.weights_name, other.weights_name) == ("random-seed0", "random-seed1")
    assert again.weights_sha == random_seed0.weights_sha != other.weights_sha
    assert random_seed0.data_config == pretrained_data_config(R2PLUS1D)
    with torch.inference_mode():
        features = random_seed0(clips)
        assert features.shape == (2, 512) and features.dtype == torch.float32
        assert torch.equal(again(clips), features)
        assert not torch.equal(other(clips), features)


def test_video_names_are_canonical_and_unknown_ones_list_the_close_matches():
    assert canonical_backbone(R2PLUS1D) == R2PLUS1D and canonical_backbone(" torchvision:s3d ") == "torchvision:s3d"
    assert is_video(R2PLUS1D) and not is_video("resnet50") and not is_video("timm:resnet18.a1_in1k")
    with pytest.raises(BackboneError, match="no video model 'r2plus1d_19' "
                                            r"\(close matches: torchvision:r2plus1d_18\); its video models: mc3_18, "):
        canonical_backbone("torchvision:r2plus1d_19")
    with pytest.raises(BackboneError, match="no video model 'resnet18'.*image backbones: resnet50 or timm:"):
        canonical_backbone("torchvision:resnet18")  # an image model of torchvision's
    with pytest.raises(BackboneError, match=r"close matches: torchvision:r2plus1d_18"):
        canonical_backbone("r2plus1d_18")  # the prefix forgotten


def test_data_configs_are_the_weights_eval_transforms_and_clips():
    kinetics = {"mean": (0.43216, 0.394666, 0.37645), "std": (0.22803, 0.22145, 0.216989)}
    assert pretrained_data_config(R2PLUS1D) == {
        "input_size": (3, 112, 112), "interpolation": "bilinear", "crop_pct": 112 / 128, "crop_mode": "center",
        **kinetics, "clip_len": 16, "clip_fps": 15.0}
    assert pretrained_data_config("torchvision:swin3d_t") == {
        "input_size": (3, 224, 224), "interpolation": "bilinear", "crop_pct": 224 / 256, "crop_mode": "center",
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "clip_len": 32, "clip_fps": 15.0}
    assert pretrained_data_config("torchvision:mvit_v2_s") == {
        "input_size": (3, 224, 224), "interpolation": "bilinear", "crop_pct": 224 / 256, "crop_mode": "center",
        "mean": (0.45, 0.45, 0.45), "std": (0.225, 0.225, 0.225), "clip_len": 16, "clip_fps": 7.5}
    assert pretrained_data_config("torchvision:s3d") == {  # 16 frames, not the 128 of torchvision's clip-level eval
        "input_size": (3, 224, 224), "interpolation": "bilinear", "crop_pct": 224 / 256, "crop_mode": "center",
        **kinetics, "clip_len": 16, "clip_fps": 15.0}
    assert "clip_len" not in pretrained_data_config("resnet50")  # how a video backbone is told from an image one


@pytest.mark.parametrize("backbone, clip, width", [
    ("torchvision:swin3d_t", (1, 1, 3, 1, 1), 768),  # padded to its 2 x 4 x 4 patches
    ("torchvision:s3d", (1, 14, 3, 224, 224), 1024),  # min_temporal_size 14, min_size 224
])
def test_the_smallest_legal_clip_gives_one_pooled_feature(backbone, clip, width):
    model = create_backbone("random", backbone=backbone, seed=0)
    assert model.num_features == width
    with torch.inference_mode():
        assert model(torch.randn(clip)).shape == (1, width)


def test_a_torchvision_file_gives_torchvision_s_pooled_features_and_round_trips(random_seed0, clips, tmp_path):
    reference = torchvision.models.video.r2plus1d_18().eval()
    torch.save(reference.state_dict(), tmp_path / "r2plus1d.pth")  # torchvision's layout, Kinetics' fc included

    loaded = create_backbone(str(tmp_path / "r2plus1d.pth"), backbone=R2PLUS1D)

    reference.fc = torch.nn.Identity()
    with torch.inference_mode():
        features = loaded(clips)
        assert torch.equal(features, reference(clips.transpose(1, 2)))  # (N, 3, T, H, W): torchvision's layout
    assert loaded.weights_name == f"sha-{loaded.weights_sha[:12]}"
    torch.save({"backbone": loaded.state_dict()}, tmp_path / "checkpoint.pt")  # epicfeat's layout: "model." keys
    again = create_backbone(str(tmp_path / "checkpoint.pt"), backbone=R2PLUS1D)
    assert (again.weights_name, again.weights_sha) == (loaded.weights_name, loaded.weights_sha)
    with torch.inference_mode():
        assert torch.equal(again(clips), features)


def test_weights_of_the_wrong_shape_name_both_shapes(random_seed0, tmp_path):
    state = dict(random_seed0.model.state_dict(), **{"layer4.1.conv2.0.3.weight": torch.zeros(512, 256, 3, 1, 1)})
    torch.save(state, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match=r"layer4\.1\.conv2\.0\.3\.weight \(512, 256, 3, 1, 1\) "
                                           r"\(expected \(512, 1152, 3, 1, 1\)\)"):
        create_backbone(str(tmp_path / "wrong.pth"), backbone=R2PLUS1D)


def test_missing_kinetics_weights_say_which_file_to_fetch_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache

    def no_network(url, dst, *args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WeightsError) as caught:
        create_backbone("pretrained", backbone=R2PLUS1D)

    message = str(caught.value)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "r2plus1d_18-91a641e6.pth"
    assert f"r2plus1d_18-91a641e6.pth is not in torch hub's cache ({cached})" in message
    assert f"curl -L -o {cached} https://download.pytorch.org/models/r2plus1d_18-91a641e6.pth" in message
    assert "--weights PATH (a r2plus1d_18 state dict or an epicfeat checkpoint)" in message
    assert "--weights random" in message


def test_image_weights_crops_the_model_cannot_take_and_finetuning_are_refused(random_seed0):
    with pytest.raises(WeightsError, match="--weights imagenet names torchvision's ResNet50 weights"):
        create_backbone("imagenet", backbone=R2PLUS1D)
    with pytest.raises(BackboneError, match="--crop 160: torchvision:mvit_v2_s takes crops of exactly 224 pixels"):
        create_backbone("random", backbone="torchvision:mvit_v2_s", crop=160)
    with pytest.raises(BackboneError, match="--crop 192: torchvision:s3d takes crops of at least 224 pixels"):
        create_backbone("random", backbone="torchvision:s3d", crop=192)
    with pytest.raises(EpicfeatError, match="finetune trains image backbones only"):
        random_seed0.set_grad_checkpointing(True)
