"""The backbone: torchvision's ResNet50 up to global average pooling, giving 2048-d frame features.

Every backbone carries ``weights_name`` (readable; a file's weights are named by their hash) and ``weights_sha``
(a hash of its tensors), which go into the feature set's identity, so features of different weights never mix.
"""
from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.checkpoint import checkpoint
from torchvision.models import ResNet50_Weights

from epicfeat.errors import EpicfeatError, listed

FEATURE_DIM = 2048

# --weights names for torchvision's ImageNet weights. "imagenet" is the better V2 recipe (80.9% top-1).
TORCHVISION_WEIGHTS = {
    "imagenet": ("imagenet1k_v2", ResNet50_Weights.IMAGENET1K_V2),
    "imagenet1k_v2": ("imagenet1k_v2", ResNet50_Weights.IMAGENET1K_V2),
    "imagenet1k_v1": ("imagenet1k_v1", ResNet50_Weights.IMAGENET1K_V1),
}


class WeightsError(EpicfeatError):
    """Backbone weights that cannot be found or loaded; the message says where they were expected and what to do."""


class ResNet50Features(nn.Module):
    """torchvision's ResNet50 without its classifier: (N, 3, H, W) -> (N, 2048) globally average-pooled features.

    The layers keep torchvision's names, so a torchvision state dict (minus ``fc.*``) loads as is. The seam the
    frame encoder uses (timm's names): ``num_features``, the pooled ``forward``, ``set_grad_checkpointing``.
    """

    num_features = FEATURE_DIM

    def __init__(self):
        super().__init__()
        # Random init (torchvision's: Kaiming normal convs, BN weight 1 / bias 0), drawn from the global RNG.
        resnet = torchvision.models.resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        self.avgpool = resnet.avgpool
        self.weights_name = "random"
        self.weights_sha = ""
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute in backward, instead of keeping, the activations of every stage that needs a gradient."""
        self.grad_checkpointing = enable

    def stages(self) -> list[nn.Module]:
        """The five stages in order: the stem (conv1, bn1, relu, maxpool), then layer1 .. layer4."""
        stem = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)  # the modules themselves, not copies
        return [stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            x = images
            for stage in self.stages():
                # A stage autograd keeps nothing for (frozen, below every trainable one) runs as it is.
                needs_grad = x.requires_grad or any(p.requires_grad for p in stage.parameters())
                x = checkpoint(stage, x, use_reentrant=False) if needs_grad else stage(x)
        else:
            x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)  # (N, 2048, 1, 1) -> (N, 2048)


def fold_batch_norms(model: ResNet50Features) -> ResNet50Features:
    """An inference copy of ``model`` with every batch norm folded into the convolution before it.

    An eval-mode batch norm is a per-channel affine map: folded, each activation map takes one pass instead of two.
    The features equal the unfolded ones up to rounding (hence ``fold_bn`` in a feature set's identity). The copy
    keeps the weights' name and hash.
    """
    if model.training:
        raise ValueError("fold_batch_norms needs a model in eval mode: training batch norms use batch statistics")
    folded = copy.deepcopy(model)
    for block, conv_name, norm_name in _conv_norm_pairs(folded):
        setattr(block, conv_name, fuse_conv_bn_eval(getattr(block, conv_name), getattr(block, norm_name)))
        setattr(block, norm_name, nn.Identity())
    return folded


def _conv_norm_pairs(model: ResNet50Features) -> list[tuple[nn.Module, str, str]]:
    """(module, conv attribute, batch norm attribute) of every convolution followed by a batch norm."""
    pairs = [(model, "conv1", "bn1")]
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:  # torchvision Bottleneck: conv1/bn1, conv2/bn2, conv3/bn3, optional downsample
            pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))  # Sequential(conv 1x1, batch norm)
    return pairs


def weights_identity(model: nn.Module) -> str:
    """First 16 hex digits of a sha256 over the state dict (key, dtype, shape and bytes of every tensor, in order),
    whatever the device and memory format."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes of any dtype
    return digest.hexdigest()[:16]


def create_backbone(weights: str = "imagenet", *, seed: int = 0) -> ResNet50Features:
    """Build the ResNet50 feature backbone in eval mode, with ``weights_name`` and ``weights_sha`` set.

    ``weights``: ``"imagenet"`` (= ``"imagenet1k_v2"``) or ``"imagenet1k_v1"`` (torch hub's cache, or downloaded
    there); ``"random"`` (torchvision's init drawn with ``seed``, the global RNG untouched); or the path of a
    ResNet50 state dict or of an epicfeat checkpoint holding a ``"backbone"`` state dict.
    """
    weights = str(weights)
    state_dict, source = None, ""
    if weights in TORCHVISION_WEIGHTS:
        name, enum = TORCHVISION_WEIGHTS[weights]
        state_dict, source = _torchvision_state_dict(weights, enum), f"torchvision {enum}"
    elif weights == "random":
        name = f"random-seed{seed}"
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"--weights {weights!r}: no such file, and not one of imagenet, imagenet1k_v1, random; give a "
                "ResNet50 state dict / epicfeat checkpoint path, or one of those names"
            )
        state_dict, source, name = _state_dict_from_file(path), str(path), None  # named by content, below
    with torch.random.fork_rng(devices=[]):  # the random init must not move the caller's RNG streams
        torch.manual_seed(seed)
        model = ResNet50Features()
    if state_dict is not None:
        _load(model, state_dict, source)
    model.weights_sha = weights_identity(model)
    model.weights_name = name if name is not None else weights_name_of_sha(model.weights_sha)
    return model.eval()


def weights_name_of_sha(weights_sha: str) -> str:
    """The name of weights read from a file: ``sha-<first 12 hex digits of their hash>``, never the file's name
    (so a copied or renamed file holding the same weights pairs with its features)."""
    return f"sha-{weights_sha[:12]}"


def _torchvision_state_dict(weights: str, enum: ResNet50_Weights) -> Mapping[str, torch.Tensor]:
    """torchvision's weights the normal way: torch hub's cache, else a download into it."""
    file_name = os.path.basename(urlparse(enum.url).path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    was_cached = cached.is_file()
    try:
        return enum.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as err:  # no network, proxy, HTTP error, hash mismatch, unreadable file: all end the same way
        if was_cached:
            problem = f"the cached file {cached} cannot be read ({type(err).__name__}: {err}); delete it and "
        else:
            problem = (f"{file_name} is not in torch hub's cache ({cached}) and downloading it failed "
                       f"({type(err).__name__}: {err}); ")
        raise WeightsError(
            f"--weights {weights}: {problem}get the file on a machine with internet and copy it to that path:\n"
            f"  mkdir -p {cached.parent} && curl -L -o {cached} {enum.url}\n"
            f"(TORCH_HOME moves the cache.) Alternatives: --weights PATH (a ResNet50 state dict or an epicfeat "
            f"checkpoint), or --weights random (seeded random weights, for tests and the demo)"
        ) from None


def _state_dict_from_file(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and "unsupported global" errors all mean: not a weights file
        raise WeightsError(
            f"{path}: cannot be read as PyTorch weights ({type(err).__name__}: {err}); give a ResNet50 state dict "
            "saved with torch.save(model.state_dict(), path), or an epicfeat checkpoint"
        ) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("backbone"), Mapping):
        obj = obj["backbone"]  # an epicfeat (finetune) checkpoint
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, Mapping) else type(obj).__name__
        raise WeightsError(
            f"{path}: holds neither a state dict of tensors nor a checkpoint with a 'backbone' state dict "
            f"(found: {keys}); save one with torch.save(model.state_dict(), path)"
        )
    return obj


def _load(model: ResNet50Features, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a ResNet50 state dict strictly, ignoring the ImageNet classifier (fc.*)."""
    trunk = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    expected = model.state_dict()
    missing = [k for k in expected if k not in trunk]
    unexpected = [k for k in trunk if k not in expected]
    wrong_shape = [f"{k} {tuple(trunk[k].shape)} (expected {tuple(expected[k].shape)})"
                   for k in expected if k in trunk and trunk[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        problems = "; ".join(f"{len(items)} {label}: {listed(items)}" for label, items in
                             (("missing", missing), ("unexpected", unexpected), ("with the wrong shape", wrong_shape))
                             if items)
        raise WeightsError(
            f"{source}: not torchvision ResNet50 weights ({problems}); the file must hold a torchvision resnet50 "
            "state dict (keys like 'conv1.weight', 'layer4.2.bn3.running_var') or an epicfeat checkpoint"
        )
    model.load_state_dict(trunk, strict=True)
