"""The backbone: frames -> one pooled feature vector per frame (or per clip), by name (``create_backbone``).

* ``resnet50``: torchvision's ResNet50 up to global average pooling (2048-d), the seed's and the default;
* ``timm:<model name>``: any timm image model, the feature being its pooled pre-logits (``num_classes=0``);
* ``torchvision:<video model>``: a torchvision Kinetics-400 video model (r2plus1d_18, mvit_v2_s, swin3d_t, s3d, ...),
  one feature per clip of frames: its pooled features before the classifier.

Every backbone carries ``weights_name`` (readable; a file's weights are named by their hash) and ``weights_sha``
(a hash of its tensors), which go into the feature set's identity, so features of different weights never mix, and
``data_config``: the preprocessing its pretrained weights expect (timm's keys: input_size, interpolation, crop_pct,
crop_mode, mean, std; a video backbone's also clip_len and clip_fps, the clips they were evaluated on).
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.checkpoint import checkpoint
from torchvision.models import ResNet50_Weights, WeightsEnum

from epicfeat.errors import EpicfeatError, listed

FEATURE_DIM = 2048
RESNET50 = "resnet50"
TIMM = "timm:"
VIDEO = "torchvision:"

# The classifier of each torchvision video family, replaced by nn.Identity so that forward ends at the pooled
# features: VideoResNet's fc (r2plus1d_18, r3d_18, mc3_18), MViT's and Swin3D's head, S3D's classifier (a 1x1x1
# convolution that S3D averages over T, H, W after: without it, that average pools the features).
VIDEO_CLASSIFIERS = ("fc", "head", "classifier")

# --weights names for torchvision's ImageNet weights. "imagenet" (= "pretrained") is the better V2 recipe (80.9%).
TORCHVISION_WEIGHTS = {
    "pretrained": ("imagenet1k_v2", ResNet50_Weights.IMAGENET1K_V2),
    "imagenet": ("imagenet1k_v2", ResNet50_Weights.IMAGENET1K_V2),
    "imagenet1k_v2": ("imagenet1k_v2", ResNet50_Weights.IMAGENET1K_V2),
    "imagenet1k_v1": ("imagenet1k_v1", ResNet50_Weights.IMAGENET1K_V1),
}


# The seed's preprocessing (shorter side 256, centre crop 224, ImageNet statistics), in timm's terms. The decode room
# resizes with swscale's bilinear filter, the interpolation torchvision's ImageNet recipe uses too.
RESNET50_DATA_CONFIG = {"input_size": (3, 224, 224), "interpolation": "bilinear", "crop_pct": 224 / 256,
                        "crop_mode": "center", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


class WeightsError(EpicfeatError):
    """Backbone weights that cannot be found or loaded; the message says where they were expected and what to do."""


class BackboneError(EpicfeatError):
    """A backbone name that names no model, or whose library is not installed."""


class ResNet50Features(nn.Module):
    """torchvision's ResNet50 without its classifier: (N, 3, H, W) -> (N, 2048) globally average-pooled features.

    The layers keep torchvision's names, so a torchvision state dict (minus ``fc.*``) loads as is. The seam the
    frame encoder uses (timm's names): ``num_features``, the pooled ``forward``, ``set_grad_checkpointing``.
    """

    num_features = FEATURE_DIM
    name = RESNET50
    data_config = RESNET50_DATA_CONFIG

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


class TimmFeatures(nn.Module):
    """A timm image model without its classifier: (N, 3, H, W) -> (N, D) pooled pre-logits, with the frame
    encoder's seam (``num_features``, ``set_grad_checkpointing``, ``stages``). ``model`` holds timm's module, so
    ``self.model.state_dict()`` is a timm state dict."""

    def __init__(self, name: str, model: nn.Module, data_config: dict):
        super().__init__()
        self.model = model
        self.name, self.data_config = name, data_config
        # A model with a pre-logits layer (a head MLP) pools to head_hidden_size, the others to num_features.
        self.num_features: int = getattr(model, "head_hidden_size", None) or model.num_features
        self.weights_name = "random"
        self.weights_sha = ""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def stages(self) -> list[nn.Module]:
        """timm's coarse layer groups in order (stem, stages or blocks, final norm), as finetune trains the last:
        each the group's own parameters, so the stem holds those outside any layer too (a ViT's pos_embed)."""
        from timm.models import group_parameters

        groups = group_parameters(self.model, self.model.group_matcher(coarse=True))  # group id -> parameter names
        params = dict(self.model.named_parameters())
        return [nn.ParameterList([params[n] for n in names]) for _, names in sorted(groups.items())]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)  # (N, 3, H, W) -> (N, D): num_classes=0 leaves the pooled pre-logits


class VideoFeatures(nn.Module):
    """A torchvision video model without its classifier: (N, T, 3, H, W) clips -> (N, D) pooled features, with
    ``num_features``. ``model`` holds torchvision's module, so ``self.model.state_dict()`` is a torchvision state
    dict (less the classifier)."""

    def __init__(self, name: str, model: nn.Module, data_config: dict):
        super().__init__()
        classifier = next(c for c in VIDEO_CLASSIFIERS if isinstance(getattr(model, c, None), nn.Module))
        last = [m for m in getattr(model, classifier).modules() if isinstance(m, (nn.Linear, nn.Conv3d))][-1]
        self.num_features: int = last.weight.shape[1]  # Linear (classes, D), Conv3d (classes, D, 1, 1, 1)
        setattr(model, classifier, nn.Identity())
        self.model = model
        self.name, self.data_config = name, data_config
        self.weights_name = "random"
        self.weights_sha = ""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise EpicfeatError(f"{self.name} is a video backbone; finetune trains image backbones only (resnet50, "
                            "timm:<model name>)")

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.model(clips.transpose(1, 2))  # (N, T, 3, H, W) -> (N, 3, T, H, W) -> (N, D)


def fold_batch_norms(model: ResNet50Features) -> ResNet50Features:
    """An inference copy of ``model`` with every batch norm folded into the convolution before it.

    An eval-mode batch norm is a per-channel affine map: folded, each activation map takes one pass instead of two.
    The features equal the unfolded ones up to rounding (hence ``fold_bn`` in a feature set's identity). The copy
    keeps the weights' name and hash.
    """
    if not isinstance(model, ResNet50Features):
        raise EpicfeatError(f"--fold-bn folds ResNet50's batch norms only; {model.name} has no such pairs: drop "
                            "--fold-bn (the default folds them for resnet50 on a CPU only)")
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


def create_backbone(weights: str = "pretrained", *, backbone: str = RESNET50, seed: int = 0,
                    crop: int | None = None) -> nn.Module:
    """Build ``backbone`` (``resnet50``, ``timm:<model name>`` or ``torchvision:<video model>``) in eval mode, with
    ``weights_name``, ``weights_sha``, ``num_features`` and ``data_config`` set.

    ``weights``: ``"pretrained"`` (the backbone's default pretrained weights, through its library's cache: torch hub
    for resnet50, whose ``"imagenet"`` = ``"imagenet1k_v2"`` and ``"imagenet1k_v1"`` name them too, the Hugging Face
    hub for timm); ``"random"`` (the library's init drawn with ``seed``, the global RNG untouched); or the path of a
    state dict (``.safetensors`` too) or of an epicfeat checkpoint holding a ``"backbone"`` state dict. ``crop``: the
    input size, for models built for one (ViTs) when it is not their pretrained one.

    * A video backbone (``torchvision:r2plus1d_18``) is a ``VideoFeatures``: (N, T, 3, H, W) clips -> (N, D), its
      ``"pretrained"`` weights torchvision's Kinetics-400 ones (torch hub's cache), ``data_config`` with clip_len and
      clip_fps; ``crop`` must fit the model (MViT takes 224 only, S3D 224 and more).
    """
    weights = str(weights)
    backbone = canonical_backbone(backbone)
    if backbone == RESNET50:
        return _create_resnet50(weights, seed)
    if backbone.startswith(VIDEO):
        return _create_video(backbone, weights, seed, crop)
    return _create_timm(backbone, weights, seed, crop)


def canonical_backbone(backbone: str) -> str:
    """``resnet50``, ``timm:<architecture>.<pretrained tag>`` (the tag timm defaults to written out, so that the
    name fixes the pretrained weights and preprocessing) or ``torchvision:<video model>`` (as given: its Kinetics-400
    weights are the only ones); an unknown name lists the close matches."""
    backbone = str(backbone).strip()
    if backbone == RESNET50:
        return backbone
    if backbone.startswith(VIDEO):
        name, known = backbone[len(VIDEO):], _video_models()
        if name not in known:
            matches = _close_matches(name, known, prefix={n: VIDEO + n for n in known})
            raise BackboneError(f"--backbone {backbone}: torchvision has no video model {name!r}{matches}; its video "
                                f"models: {', '.join(known)} (image backbones: resnet50 or timm:<model name>)")
        return backbone
    if backbone.startswith(TIMM):
        timm = _import_timm(backbone)
        name = backbone[len(TIMM):]
        if not timm.is_model(name):
            known = timm.list_models(pretrained=True) + timm.list_models()
            matches = _close_matches(name, known, prefix={n: TIMM + n for n in known})
            raise BackboneError(f"--backbone {backbone}: timm has no model {name!r}{matches}; "
                                "`python -c \"import timm; print(timm.list_models('*vit*'))\"` lists them")
        try:
            cfg = timm.models.get_pretrained_cfg(name)
        except RuntimeError:  # "Invalid pretrained tag"
            architecture = name.partition(".")[0]
            raise BackboneError(f"--backbone {backbone}: timm has no pretrained tag {name.partition('.')[2]!r} for "
                                f"{architecture}; its tags: {listed(timm.list_pretrained(architecture + '.*'), 8)}"
                                ) from None
        return f"{TIMM}{cfg.architecture}.{cfg.tag}" if cfg is not None and cfg.tag else backbone
    try:
        import timm

        timm_names = timm.list_models()
    except ImportError:
        timm_names = []
    video_names = _video_models()
    prefix = {**{n: TIMM + n for n in timm_names if n != RESNET50}, **{n: VIDEO + n for n in video_names}}
    matches = _close_matches(backbone, [RESNET50, *timm_names, *video_names], prefix=prefix)  # resnet50: ours
    raise BackboneError(f"--backbone {backbone}: not a backbone{matches}; give resnet50, timm:<model name> (any timm "
                        "image model) or torchvision:<video model> (r2plus1d_18, mvit_v2_s, swin3d_t, s3d, ...)")


def is_video(backbone: str) -> bool:
    """Whether ``backbone`` (a canonical name) is a video backbone: clips in, one feature per clip."""
    return str(backbone).strip().startswith(VIDEO)


def pretrained_data_config(backbone: str) -> dict:
    """The preprocessing the pretrained weights of ``backbone`` (a canonical name) expect, in timm's keys, without
    building the model: input_size (3, H, W), interpolation, crop_pct, crop_mode, mean, std; a video backbone's
    also clip_len (frames, int) and clip_fps (float), the clips the weights were evaluated on."""
    if backbone == RESNET50:
        return dict(RESNET50_DATA_CONFIG)
    if backbone.startswith(VIDEO):
        return _video_data_config(backbone[len(VIDEO):])
    timm = _import_timm(backbone)
    cfg = timm.models.get_pretrained_cfg(backbone[len(TIMM):])
    return timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg is not None else {})


def resize_for(data_config: dict, crop: int) -> int:
    """The shorter side before a centre crop of ``crop``: timm's eval transform, floor(crop / crop_pct)."""
    return math.floor(crop / data_config["crop_pct"])


def _video_data_config(name: str) -> dict:
    weights = torchvision.models.get_model_weights(name).DEFAULT
    transform = weights.transforms()  # VideoClassification: crop_size [c, c], resize_size [short side] or [h, w]
    crop = transform.crop_size[0]
    # torchvision resizes some clips to a fixed size (r2plus1d_18's 128 x 171, s3d's 256 x 256); epicfeat resizes the
    # shorter side to the smaller (128, 256), keeping the aspect ratio (EPIC is 16:9), then crops the centre.
    resize = min(transform.resize_size)
    docs = weights.meta["_docs"]  # "... parameters `frame_rate=15`, `clips_per_video=5`, and `clip_len=16`"
    clip_len, clip_fps = int(re.search(r"clip_len=(\d+)", docs)[1]), float(re.search(r"frame_rate=([\d.]+)", docs)[1])
    if name == "s3d":
        # s3d was evaluated on one 128-frame clip per video (8.5 s, far longer than most EPIC actions); it takes any
        # clip of min_temporal_size (14) frames or more, so its clips are 16 frames like the others'.
        clip_len = 16
    return {"input_size": (3, crop, crop), "interpolation": transform.interpolation.value, "crop_pct": crop / resize,
            "crop_mode": "center", "mean": tuple(transform.mean), "std": tuple(transform.std),
            "clip_len": clip_len, "clip_fps": clip_fps}


def _video_models() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models.video)


def _import_timm(backbone: str):
    try:
        import timm
        import timm.data
        import timm.models
    except ImportError as err:
        raise BackboneError(f"--backbone {backbone} needs the timm package, which is not installed ({err}): "
                            "pip install timm (or pip install -e . in epicfeat's folder)") from None
    return timm


def _close_matches(name: str, known: list[str], prefix: dict[str, str] | None = None) -> str:
    """' (close matches: a, b)': the names that start with ``name``, else the most similar (shown through
    ``prefix``, e.g. with "timm:")."""
    known = sorted(set(known))
    matches = [k for k in known if k.startswith(name)][:5] or difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    shown = [(prefix or {}).get(m, m) for m in matches]
    return f" (close matches: {', '.join(shown)})" if shown else ""


def _create_resnet50(weights: str, seed: int) -> ResNet50Features:
    state_dict, source = None, ""
    if weights in TORCHVISION_WEIGHTS:
        name, enum = TORCHVISION_WEIGHTS[weights]
        state_dict, source = _torchvision_state_dict(weights, enum, "a ResNet50 state dict"), f"torchvision {enum}"
    elif weights == "random":
        name = f"random-seed{seed}"
    else:
        path = _weights_file(weights, "pretrained, imagenet, imagenet1k_v1, random", "ResNet50 state dict")
        state_dict, source, name = _state_dict_from_file(path), str(path), None  # named by content, below
    with torch.random.fork_rng(devices=[]):  # the random init must not move the caller's RNG streams
        torch.manual_seed(seed)
        model = ResNet50Features()
    if state_dict is not None:
        _load_trunk(model, state_dict, ("fc",), source, "torchvision ResNet50 weights (keys like 'conv1.weight', "
                                                        "'layer4.2.bn3.running_var')")  # fc: ImageNet's classifier
    return _named(model, name)


def _create_timm(backbone: str, weights: str, seed: int, crop: int | None) -> TimmFeatures:
    timm = _import_timm(backbone)
    name = backbone[len(TIMM):]
    cfg = timm.models.get_pretrained_cfg(name)
    data_config = pretrained_data_config(backbone)
    kwargs = {"num_classes": 0}  # no classifier: forward gives the pooled pre-logits
    if crop is not None and crop != data_config["input_size"][-1] and cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = crop  # position embeddings for this input (timm resamples pretrained ones)
    if weights in TORCHVISION_WEIGHTS and weights != "pretrained":
        raise WeightsError(f"--weights {weights} names torchvision's ResNet50 weights; {backbone} takes pretrained "
                           "(timm's default pretrained weights), random or PATH")
    state_dict, source, weights_name = None, "", "pretrained"
    if weights == "pretrained":
        model = _timm_pretrained(timm, backbone, cfg, kwargs)
    else:
        if weights == "random":
            weights_name = f"random-seed{seed}"
        else:
            path = _weights_file(weights, "pretrained, random", f"{backbone} state dict")
            state_dict, source, weights_name = _state_dict_from_file(path), str(path), None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(name, pretrained=False, **kwargs)
    features = TimmFeatures(backbone, model, data_config)
    if state_dict is not None:
        classifier = cfg.classifier if cfg is not None else "head"
        classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        _load_trunk(model, state_dict, classifiers, source,
                    f"timm {name} weights (a state dict of timm.create_model({name!r}))")
    return _named(features, weights_name)


def _create_video(backbone: str, weights: str, seed: int, crop: int | None) -> VideoFeatures:
    name = backbone[len(VIDEO):]
    enum = torchvision.models.get_model_weights(name).DEFAULT  # Kinetics-400
    smallest = enum.meta["min_size"][0]
    fixed = name.startswith("mvit")  # MViT's position tables are built for min_size crops of min_temporal_size frames
    if crop is not None and (crop < smallest or fixed and crop != smallest):
        raise BackboneError(f"--crop {crop}: {backbone} takes crops of {'exactly' if fixed else 'at least'} "
                            f"{smallest} pixels; give --crop {smallest} or leave it out")
    if weights in TORCHVISION_WEIGHTS and weights != "pretrained":
        raise WeightsError(f"--weights {weights} names torchvision's ResNet50 weights; {backbone} takes pretrained "
                           "(torchvision's Kinetics-400 weights), random or PATH")
    state_dict, source, weights_name = None, "", "pretrained"
    if weights == "pretrained":
        state_dict, source = _torchvision_state_dict(weights, enum, f"a {name} state dict"), f"torchvision {enum}"
    elif weights == "random":
        weights_name = f"random-seed{seed}"
    else:
        path = _weights_file(weights, "pretrained, random", f"{backbone} state dict")
        state_dict, source, weights_name = _state_dict_from_file(path), str(path), None
    with torch.random.fork_rng(devices=[]):  # the random init must not move the caller's RNG streams
        torch.manual_seed(seed)
        features = VideoFeatures(backbone, torchvision.models.get_model(name), pretrained_data_config(backbone))
    if state_dict is not None:  # Kinetics' classifier dropped
        _load_trunk(features.model, state_dict, VIDEO_CLASSIFIERS, source,
                    f"torchvision {name} weights (a state dict of torchvision.models.{name}())")
    return _named(features, weights_name)


def _timm_pretrained(timm, backbone: str, cfg, kwargs: dict) -> nn.Module:
    """timm's pretrained weights the normal way: the Hugging Face hub's cache (or torch hub's, for weights timm
    fetches by URL), else a download into it."""
    name = backbone[len(TIMM):]
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:  # no network, proxy, HTTP error, unreadable file: all end the same way
        reason = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
        if cfg is not None and cfg.hf_hub_id:
            from huggingface_hub.constants import HF_HUB_CACHE

            repo = cfg.hf_hub_id
            folder = Path(HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
            where = (f"the Hugging Face hub's cache ({folder}) does not hold them and downloading failed ({reason}). "
                     f"On a machine with internet run\n  hf download {repo} model.safetensors\nand copy the folder "
                     f"{folder.name} of its cache to {folder} here (HF_HOME moves the cache), or download\n"
                     f"  https://huggingface.co/{repo}/resolve/main/model.safetensors\nand pass --weights that file")
        elif cfg is not None and cfg.url:
            cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
            where = (f"torch hub's cache does not hold {cached.name} and downloading failed ({reason}). On a machine "
                     f"with internet fetch it and copy it to that path:\n  mkdir -p {cached.parent} && curl -L -o "
                     f"{cached} {cfg.url}\n(TORCH_HOME moves the cache), or pass --weights that file")
        else:
            where = f"timm knows no pretrained weights for it ({reason})"
        raise WeightsError(f"--weights pretrained for {backbone}: {where}. --weights random gives seeded random "
                           "weights (tests, the demo)") from None


def _weights_file(weights: str, names: str, what: str) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"--weights {weights!r}: no such file, and not one of {names}; give a {what} / epicfeat "
                           "checkpoint path, or one of those names")
    return path


def _named(model: nn.Module, name: str | None) -> nn.Module:
    model.weights_sha = weights_identity(model)
    model.weights_name = name if name is not None else weights_name_of_sha(model.weights_sha)
    return model.eval()


def weights_name_of_sha(weights_sha: str) -> str:
    """The name of weights read from a file: ``sha-<first 12 hex digits of their hash>``, never the file's name
    (so a copied or renamed file holding the same weights pairs with its features)."""
    return f"sha-{weights_sha[:12]}"


def _torchvision_state_dict(weights: str, enum: WeightsEnum, alternative: str) -> Mapping[str, torch.Tensor]:
    """torchvision's weights ``enum`` the normal way: torch hub's cache, else a download into it. ``alternative``:
    what a --weights PATH would hold instead ("a ResNet50 state dict")."""
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
            f"(TORCH_HOME moves the cache.) Alternatives: --weights PATH ({alternative} or an epicfeat checkpoint), "
            f"or --weights random (seeded random weights, for tests and the demo)"
        ) from None


def _state_dict_from_file(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":  # the Hugging Face hub's format (timm's weights)
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and "unsupported global" errors all mean: not a weights file
        raise WeightsError(
            f"{path}: cannot be read as PyTorch weights ({type(err).__name__}: {err}); give a state dict "
            "(.safetensors, or saved with torch.save(model.state_dict(), path)), or an epicfeat checkpoint"
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


def _load_trunk(model: nn.Module, state_dict: Mapping[str, torch.Tensor], classifiers: tuple[str, ...], source: str,
                what: str) -> None:
    """``_load`` without the keys of ``classifiers`` (top-level module names): a library's file holds its classifier,
    the model has none. An epicfeat checkpoint's wrapper state dict (TimmFeatures, VideoFeatures) loads too."""
    if all(k.startswith("model.") for k in state_dict):  # the wrapper's keys: "model." + the library's
        state_dict = {k[len("model."):]: v for k, v in state_dict.items()}
    trunk = {k: v for k, v in state_dict.items() if not k.startswith(tuple(c + "." for c in classifiers))}
    _load(model, trunk, source, what)


def _load(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, what: str) -> None:
    """Load ``state_dict`` strictly; a mismatch names the missing, unexpected and wrongly shaped keys (both shapes)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [f"{k} {tuple(state_dict[k].shape)} (expected {tuple(expected[k].shape)})"
                   for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        problems = "; ".join(f"{len(items)} {label}: {listed(items)}" for label, items in
                             (("missing", missing), ("unexpected", unexpected), ("with the wrong shape", wrong_shape))
                             if items)
        raise WeightsError(f"{source}: not {what} ({problems}); the file must hold such a state dict or an epicfeat "
                           "checkpoint")
    model.load_state_dict(state_dict, strict=True)
