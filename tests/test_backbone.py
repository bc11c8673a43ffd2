"""backbone: seeded random weights, output shape, weight files and checkpoints, clear errors. No network is used."""
import urllib.error

import pytest
import torch

from epicfeat.backbone import (FEATURE_DIM, ResNet50Features, WeightsError, create_backbone, fold_batch_norms,
                               weights_identity)
from epicfeat.errors import EpicfeatError


@pytest.fixture(scope="module")
def random_seed0() -> ResNet50Features:
    return create_backbone("random", seed=0)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # (2, 3, 64, 64)


def test_random_weights_are_reproducible_per_seed_and_leave_the_global_rng_alone(random_seed0):
    state = torch.get_rng_state()
    again = create_backbone("random", seed=0)
    other = create_backbone("random", seed=1)
    assert torch.equal(torch.get_rng_state(), state)

    assert random_seed0.weights_name == "random-seed0" and other.weights_name == "random-seed1"
    assert again.weights_sha == random_seed0.weights_sha != other.weights_sha
    assert len(random_seed0.weights_sha) == 16
    assert torch.equal(again.layer4[2].conv3.weight, random_seed0.layer4[2].conv3.weight)
    assert not torch.equal(other.layer4[2].conv3.weight, random_seed0.layer4[2].conv3.weight)


def test_output_is_2048_features_per_image_at_any_input_size(random_seed0):
    assert not random_seed0.training  # eval mode: BN uses running statistics
    with torch.no_grad():
        for size in (112, 224):
            assert random_seed0(torch.zeros(1, 3, size, size)).shape == (1, FEATURE_DIM)
        assert random_seed0(torch.zeros(2, 3, 64, 64)).shape == (2, 2048)


def test_folded_batch_norms_give_the_same_features_and_leave_the_model_alone(images):
    """Every batch norm folds into its convolution: none is left, and the features are the unfolded ones up to
    fp32 rounding, with batch norm statistics far from the random init's (mean 0, var 1, weight 1, bias 0)."""
    model = create_backbone("random", seed=0)
    generator = torch.Generator().manual_seed(1)
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        channels = norm.num_features
        norm.running_mean.copy_(torch.randn(channels, generator=generator) * 0.5)  # (C,)
        norm.running_var.copy_(torch.rand(channels, generator=generator) * 2 + 0.1)
        norm.weight.data.copy_(torch.rand(channels, generator=generator) + 0.5)
        norm.bias.data.copy_(torch.randn(channels, generator=generator) * 0.2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batch_norms(model)

    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 53  # the original keeps its 53
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert (folded.weights_name, folded.weights_sha) == (model.weights_name, model.weights_sha)
    with torch.inference_mode():
        expected, got = model(images), folded(images)  # (2, 2048) each
    assert got.shape == (2, FEATURE_DIM)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert not torch.equal(got, expected)  # really another computation, not the same modules
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(create_backbone("random", seed=0).train())


def test_state_dict_file_round_trip(random_seed0, images, tmp_path):
    # A torchvision-style file: trunk keys plus the ImageNet classifier, which is ignored.
    state = dict(random_seed0.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)

    loaded = create_backbone(str(path))

    assert loaded.weights_name == f"sha-{random_seed0.weights_sha[:12]}"  # named by content, not by file
    assert loaded.weights_sha == random_seed0.weights_sha == weights_identity(random_seed0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), random_seed0(images), rtol=0, atol=0)


def test_epicfeat_checkpoint_with_a_backbone_state_dict(random_seed0, tmp_path):
    path = tmp_path / "finetuned.pt"
    torch.save({"backbone": random_seed0.state_dict(), "epoch": 3, "config": {"lr": 0.01}}, path)

    loaded = create_backbone(path)

    assert loaded.weights_sha == random_seed0.weights_sha and loaded.weights_name == f"sha-{random_seed0.weights_sha[:12]}"


def test_weights_files_are_named_by_their_content_not_their_file_name(random_seed0, tmp_path):
    """Issue 15: last.pt and best.pt holding one backbone were two feature sets; a renamed copy was refused."""
    import shutil

    from epicfeat.backbone import weights_name_of_sha

    last = tmp_path / "last.pt"
    torch.save({"backbone": random_seed0.state_dict()}, last)
    copy = tmp_path / "elsewhere" / "renamed.pt"
    copy.parent.mkdir()
    shutil.copy(last, copy)
    other = tmp_path / "best.pt"
    torch.save({"backbone": create_backbone("random", seed=1).state_dict()}, other)

    names = {path.name: (b.weights_name, b.weights_sha) for path in (last, copy, other) for b in [create_backbone(path)]}
    assert names["last.pt"] == names["renamed.pt"] == (weights_name_of_sha(random_seed0.weights_sha),
                                                       random_seed0.weights_sha)
    assert names["best.pt"][0] != names["last.pt"][0] and names["best.pt"][1] != names["last.pt"][1]


def test_weights_identity_follows_the_numbers(random_seed0):
    changed = create_backbone("random", seed=0)
    with torch.no_grad():
        changed.bn1.running_mean[0] += 1.0
    assert weights_identity(changed) != random_seed0.weights_sha
    assert weights_identity(changed.to(memory_format=torch.channels_last)) == weights_identity(changed)


def test_bad_weight_files_raise_weights_error_naming_the_file(random_seed0, tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="cannot be read as PyTorch weights") as caught:
        create_backbone(garbage)
    assert str(garbage) in str(caught.value)

    wrong_keys = tmp_path / "other_model.pth"
    state = dict(random_seed0.state_dict())
    state.pop("layer4.2.bn3.running_var")
    state["head.weight"] = torch.zeros(3)
    torch.save(state, wrong_keys)
    with pytest.raises(WeightsError) as caught:
        create_backbone(wrong_keys)
    message = str(caught.value)
    assert str(wrong_keys) in message
    assert "1 missing: layer4.2.bn3.running_var" in message and "1 unexpected: head.weight" in message

    not_a_state_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_state_dict)
    with pytest.raises(WeightsError, match="neither a state dict"):
        create_backbone(not_a_state_dict)

    with pytest.raises(WeightsError, match="no such file"):
        create_backbone(str(tmp_path / "absent.pth"))


@pytest.mark.parametrize(
    "weights, file_name", [("imagenet", "resnet50-11ad3fa6.pth"), ("imagenet1k_v1", "resnet50-0676ba61.pth")]
)
def test_missing_imagenet_weights_explain_where_to_put_them(tmp_path, monkeypatch, weights, file_name):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache

    def no_network(url, dst, *args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)

    with pytest.raises(WeightsError) as caught:
        create_backbone(weights)

    message = str(caught.value)
    expected_path = tmp_path / "torch" / "hub" / "checkpoints" / file_name
    assert str(expected_path) in message
    assert f"curl -L -o {expected_path} https://download.pytorch.org/models/{file_name}" in message
    assert "--weights PATH" in message and "--weights random" in message


def test_imagenet_weights_are_read_from_the_hub_cache_without_network(random_seed0, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("must not download"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    # Stand-in for torchvision's file (same layout: trunk + fc), so the test needs no 100 MB download.
    state = dict(random_seed0.state_dict(), **{"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    torch.save(state, cache / "resnet50-11ad3fa6.pth")

    model = create_backbone("imagenet")

    assert model.weights_name == "imagenet1k_v2" and model.weights_sha == random_seed0.weights_sha

    (cache / "resnet50-0676ba61.pth").write_bytes(b"half a download")
    with pytest.raises(WeightsError, match="cannot be read") as caught:
        create_backbone("imagenet1k_v1")
    assert str(cache / "resnet50-0676ba61.pth") in str(caught.value) and "delete it" in str(caught.value)


def test_timm_random_weights_are_seeded_leave_the_rng_alone_and_expose_the_encoder_seam():
    state = torch.random.get_rng_state()
    a = create_backbone("random", backbone="timm:resnet18", seed=0)
    again = create_backbone("random", backbone="timm:resnet18", seed=0)
    other = create_backbone("random", backbone="timm:resnet18", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.weights_sha == again.weights_sha != other.weights_sha and a.weights_name == "random-seed0"
    assert a.name == "timm:resnet18.a1_in1k" and a.num_features == 512 and not a.training
    assert a.data_config["interpolation"] == "bicubic" and a.data_config["crop_pct"] == 0.95
    stages = a.stages()  # timm's coarse groups: the stem, layer1 .. layer4
    assert len(stages) == 5 and stages[-1][0] is a.model.layer4[0].conv1.weight  # each group's own parameters
    with torch.inference_mode():
        assert a(torch.zeros(2, 3, 32, 32)).shape == (2, 512)  # pooled pre-logits, no classifier
    a.set_grad_checkpointing(True)
    assert a.model.grad_checkpointing is True
    with pytest.raises(EpicfeatError, match="folds ResNet50's batch norms only"):
        fold_batch_norms(a)
