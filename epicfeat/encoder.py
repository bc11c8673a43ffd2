"""The frame encoder: frames -> features, the one forward pass of extract, predict, export and finetune.

``create_encoder`` builds the encoder a feature set's identity records, so every later use of the backbone
computes the cached numbers.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from epicfeat.backbone import RESNET50, TORCHVISION_WEIGHTS, WeightsError, create_backbone, fold_batch_norms
from epicfeat.devices import PRECISION_DTYPES, cuda_settings

#: "fp32" on a GPU is real fp32: TF32 stays off around every model call, as each identity records (``tf32``).
TF32 = False

# Besides torchvision's names, the weights a feature set can be re-created from without being told where they are.
_RANDOM_WEIGHTS = re.compile(r"random-seed(\d+)")


class FrameEncoder(nn.Module):
    """images (N, 3, H, W) or a video backbone's clips (N, T, 3, H, W), values 0..255 -> features (N, num_features)
    float32.

    ``forward_features`` normalises, lays the pixels out and runs the backbone under autocast to ``precision``;
    gradients flow (finetune trains through it). ``encode`` is inference as extract stores rows.
    """

    def __init__(self, backbone: nn.Module, *, mean: Sequence[float], std: Sequence[float], precision: str,
                 channels_last: bool):
        super().__init__()
        if precision not in PRECISION_DTYPES:
            raise ValueError(f"precision must be one of {', '.join(PRECISION_DTYPES)}; got {precision!r}")
        self.precision = precision
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # The kernels (oneDNN's bf16 ones above all) depend on the layout of both the input and the weights.
        self.backbone = backbone.to(memory_format=self.memory_format)
        self.num_features: int = backbone.num_features
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255,
                             persistent=False)
        self.register_buffer("pixel_inv_std", 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255),
                             persistent=False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the stages that train (recomputed in backward instead of kept)."""
        self.backbone.set_grad_checkpointing(enable)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (images.float() - self.pixel_mean) * self.pixel_inv_std  # (N, 3, H, W) float32
        pixels = pixels.contiguous(memory_format=self.memory_format)
        dtype = PRECISION_DTYPES[self.precision]
        with torch.autocast(pixels.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return self.backbone(pixels).float()  # (N, D)

    forward = forward_features

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, *, pad_to: int | None = None,
               dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """(N, 3, H, W) 0..255 -> (N, D) rounded to ``dtype``, on the encoder's device, as extract stores rows.

        ``pad_to`` pads a short batch with black frames, as extract pads its last batch: kernels pick their
        algorithm by batch size. Only padded batches (one shape) are autotuned by cuDNN.
        """
        rows = len(images)
        images = images.to(self.pixel_mean.device, non_blocking=True)
        if pad_to is not None and rows < pad_to:
            images = torch.cat([images, images.new_zeros((pad_to - rows, *images.shape[1:]))])  # (pad_to, 3, H, W)
        with cuda_settings(tf32=TF32, cudnn_benchmark=pad_to is not None):
            features = self.forward_features(images)  # (pad_to or N, D) float32
        return features[:rows].to(dtype)


def create_encoder(feature_set: Mapping[str, Any], device: torch.device, *, weights: str | None = None,
                   seed: int | None = None, trainable: bool = False) -> FrameEncoder:
    """The encoder ``feature_set`` (an identity dict) was extracted with, on ``device``, in eval mode.

    The backbone is the identity's (``resnet50``, ``timm:<name>``). ``weights`` None derives them from the
    identity's name (``random-seedN``, ``pretrained``, ``imagenet1k_v1/v2``); otherwise a
    name, ``random`` (with ``seed``, default the identity's N) or a path. They must hash to ``weights_sha``.
    """
    recorded = str(feature_set["weights"])
    random_seed = _RANDOM_WEIGHTS.fullmatch(recorded)
    if weights is None and random_seed is None and recorded not in TORCHVISION_WEIGHTS:  # "pretrained" is there
        raise WeightsError(f"the features were extracted with backbone weights {recorded!r}: pass --weights PATH "
                           "with that weights file (the one given to `epicfeat extract`)")
    if seed is None:
        seed = int(random_seed.group(1)) if random_seed else 0
    if weights is None:
        weights = "random" if random_seed else recorded
    backbone = create_backbone(weights, backbone=feature_set.get("backbone", RESNET50), seed=seed,
                               crop=feature_set.get("crop"))
    if backbone.weights_sha != feature_set["weights_sha"]:
        raise WeightsError(
            f"backbone weights {backbone.weights_name} (hash {backbone.weights_sha}) are not the ones the features "
            f"were extracted with ({recorded}, hash {feature_set['weights_sha']}): a model trained on features of "
            f"{recorded!r} gives meaningless scores on others. Pass --weights with the name or file the feature set "
            "was extracted with (or omit --weights to derive them)"
        )
    return build_encoder(backbone, feature_set, device, trainable=trainable)


def build_encoder(backbone: nn.Module, feature_set: Mapping[str, Any], device: torch.device, *,
                  trainable: bool = False) -> FrameEncoder:
    """``backbone`` run as ``feature_set`` says (batch norms folded unless ``trainable``, mean / std, precision,
    layout, compile), on ``device``, in eval mode: for a backbone in hand, ``create_encoder`` loads one."""
    backbone = backbone.eval()
    if feature_set["fold_bn"] and not trainable:
        backbone = fold_batch_norms(backbone)  # one pass per activation map instead of two
    encoder = FrameEncoder(backbone, mean=feature_set["mean"], std=feature_set["std"],
                           precision=feature_set["precision"],
                           # a video backbone's clips are 5-d: channels_last is a layout of 4-d images
                           channels_last=feature_set["channels_last"] and int(feature_set.get("clip_len", 1)) == 1)
    encoder = encoder.to(device).eval()
    if feature_set["compile"]:
        encoder.backbone = torch.compile(encoder.backbone)
    return encoder
