"""encoder: one forward pass for every command, equal bit for bit to the path extract and predict ran; padding,
activation checkpointing, and the identity's checks."""
import pytest
import torch

from epicfeat.backbone import WeightsError, create_backbone
from epicfeat.devices import native_bf16_cpu
from epicfeat.encoder import FrameEncoder, build_encoder, create_encoder
from epicfeat.frames import Preprocess

PREPROCESS = Preprocess(resize=64, crop=56)
CPU = torch.device("cpu")
PRECISIONS = ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(
    not native_bf16_cpu(), reason="bf16 autocast on a CPU without native bf16 is emulated (slow, other numbers)"))]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("random", seed=0)


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    """Five uint8 RGB crops as decoding gives them: (5, 56, 56, 3)."""
    return torch.randint(0, 256, (5, 56, 56, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def _identity(backbone, **changes) -> dict:
    return {"weights": backbone.weights_name, "weights_sha": backbone.weights_sha, "mean": list(PREPROCESS.mean),
            "std": list(PREPROCESS.std), "precision": "fp32", "channels_last": True, "compile": False,
            "fold_bn": False, **changes}


def _old_predict_path(backbone, frames, precision: str, channels_last: bool, pad_to: int) -> torch.Tensor:
    """What predict's FrameEncoder (and extract's ModelRunner) computed: pad with black frames, Preprocess.normalize,
    the layout, the backbone under autocast, float32, rounded to float16."""
    model = backbone.eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    padded = torch.cat([frames, torch.zeros((pad_to - len(frames), *frames.shape[1:]), dtype=torch.uint8)])
    pixels = PREPROCESS.normalize(padded)  # (pad_to, 3, H, W) float32
    pixels = pixels.contiguous(memory_format=torch.channels_last) if channels_last else pixels.contiguous()
    dtype = {"bf16": torch.bfloat16}.get(precision)
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        features = model(pixels)  # (pad_to, 2048)
    return features[: len(frames)].float().to(torch.float16)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("channels_last", [True, False])
def test_encode_equals_the_path_extract_and_predict_ran_bit_for_bit(backbone, frames, precision, channels_last):
    encoder = build_encoder(backbone, _identity(backbone, precision=precision, channels_last=channels_last), CPU)
    got = encoder.encode(frames.permute(0, 3, 1, 2), pad_to=8)  # (5, 2048) float16
    expected = _old_predict_path(create_backbone("random", seed=0), frames, precision, channels_last, pad_to=8)
    assert got.dtype == torch.float16 and got.shape == (5, 2048) and encoder.num_features == 2048
    assert torch.equal(got, expected)
    assert got.float().std() > 0  # a real computation, not zeros on both sides


def test_a_short_batch_padded_with_black_frames_equals_the_full_batch(backbone, frames):
    encoder = build_encoder(backbone, _identity(backbone), CPU)
    images = frames.permute(0, 3, 1, 2)  # (5, 3, 56, 56) channels-last view, as decoded
    black = torch.cat([images[:3], torch.zeros_like(images[:5])])  # (8, 3, 56, 56): three frames, five black
    padded = encoder.encode(images[:3], pad_to=8)
    assert padded.shape == (3, 2048) and torch.equal(padded, encoder.encode(black)[:3])
    # Floats 0..255 and uint8 are the same input; features in float32 on request.
    as_float = encoder.encode(images[:3].float(), pad_to=8, dtype=torch.float32)
    assert as_float.dtype == torch.float32 and torch.equal(as_float.to(torch.float16), padded)
    assert encoder.encode(images, pad_to=3).shape == (5, 2048)  # a full batch is never cut


def test_activation_checkpointing_gives_the_same_gradients_and_recomputes_only_the_trainable_stages(frames):
    def run(checkpointing: bool):
        backbone = create_backbone("random", seed=0)
        encoder = create_encoder(_identity(backbone, fold_bn=True), CPU, trainable=True)
        encoder.set_grad_checkpointing(checkpointing)
        encoder.requires_grad_(False)
        for stage in encoder.backbone.stages()[3:]:  # layer3 and layer4 train, as finetune's trainable_stages=2
            stage.requires_grad_(True)
        calls = {"stem": 0, "layer4": 0}
        encoder.backbone.conv1.register_forward_hook(lambda *_: calls.__setitem__("stem", calls["stem"] + 1))
        encoder.backbone.layer4[0].conv1.register_forward_hook(
            lambda *_: calls.__setitem__("layer4", calls["layer4"] + 1))
        features = encoder(frames.permute(0, 3, 1, 2))  # (5, 2048)
        features.square().mean().backward()
        grads = {name: p.grad for name, p in encoder.named_parameters() if p.requires_grad}
        return features.detach(), grads, calls

    features, grads, calls = run(False)
    checkpointed_features, checkpointed_grads, checkpointed_calls = run(True)
    assert torch.equal(checkpointed_features, features)
    assert grads.keys() == checkpointed_grads.keys() and any("layer3" in name for name in grads)
    assert all(torch.equal(checkpointed_grads[name], grads[name]) for name in grads)
    # layer4 ran again in backward (its first convolution did); the frozen stem keeps nothing for backward, so it ran once.
    assert calls == {"stem": 1, "layer4": 1} and checkpointed_calls == {"stem": 1, "layer4": 2}


def test_create_encoder_builds_the_identity_s_encoder_and_refuses_other_weights(backbone):
    folded = create_encoder(_identity(backbone, fold_bn=True, precision="bf16", channels_last=False), CPU)
    assert (folded.precision, folded.memory_format, folded.training) == ("bf16", torch.contiguous_format, False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    trainable = create_encoder(_identity(backbone, fold_bn=True), CPU, trainable=True)  # folded norms cannot train
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in trainable.modules()) == 53
    assert isinstance(trainable, FrameEncoder) and trainable.backbone.weights_sha == backbone.weights_sha

    other = create_backbone("random", seed=1)
    with pytest.raises(WeightsError) as caught:
        create_encoder(_identity(backbone), CPU, weights="random", seed=1)
    message = str(caught.value)
    assert "\n" not in message and other.weights_sha in message and backbone.weights_sha in message
    assert "random-seed1" in message and "trained on features of 'random-seed0'" in message
    with pytest.raises(WeightsError, match="extracted with backbone weights 'sha-0123456789ab': pass --weights PATH"):
        create_encoder(_identity(backbone, weights="sha-0123456789ab"), CPU)
