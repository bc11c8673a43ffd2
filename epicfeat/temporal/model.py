"""The stage-two model: standardise cached features, run a BiLSTM over time, pool, classify verb and noun.

    features (B, T, D) ──► (x - mean) / std ──► 2-layer BiLSTM ──► pool over T ──► dropout ──► verb head (B, Cv)
                            (buffers, from the                     mean | max |               └► noun head (B, Cn)
                             training split)                       last | attention

The standardisation lives in the model (buffers in its state dict), so whoever evaluates, predicts or exports
applies exactly the scaling it was trained with. The BiLSTM is single-layer BiLSTMs with ``nn.Dropout`` between
them: every mask comes from torch's RNG (saved in last.pt; cuDNN's multi-layer dropout has a state of its own),
and on the CPU the numbers equal ``nn.LSTM(num_layers=2, dropout=p)``'s. ``compute_dtype`` (not saved) is what the
LSTM computes in, by explicit casts (see ``epicfeat.temporal.precision``); the rest stays float32.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from epicfeat.configs import POOLINGS  # one list, shared with the config


@dataclass(frozen=True, kw_only=True)
class TemporalModelArgs:
    """Everything needed to rebuild a ``TemporalModel`` (stored in every checkpoint)."""

    input_dim: int = 2048  # feature size per row (ResNet50 pooled features)
    hidden: int = 512  # LSTM hidden units per direction
    layers: int = 2  # stacked BiLSTM layers
    lstm_dropout: float = 0.3  # dropout between LSTM layers (none with one layer)
    dropout: float = 0.5  # dropout on the pooled vector, before the heads
    pooling: str = "mean"  # how the T outputs become one vector: mean | max | last | attention
    n_verbs: int  # verb classes (97 on EPIC-100)
    n_nouns: int  # noun classes (300 on EPIC-100)

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        for name in ("input_dim", "hidden", "layers", "n_verbs", "n_nouns"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class TemporalModel(nn.Module):
    """Standardise -> BiLSTM -> temporal pooling -> dropout -> separate verb and noun linear heads."""

    def __init__(self, args: TemporalModelArgs):
        super().__init__()
        self.args = args
        # Per-dimension statistics of the training features; identity scaling until set_feature_stats is called.
        self.register_buffer("feature_mean", torch.zeros(args.input_dim))
        self.register_buffer("feature_std", torch.ones(args.input_dim))
        # One single-layer BiLSTM per layer (module docstring): layer k reads layer k - 1's (B, T, 2H) outputs.
        self.lstm = nn.ModuleList(
            nn.LSTM(input_size=args.input_dim if k == 0 else 2 * args.hidden, hidden_size=args.hidden,
                    bidirectional=True, batch_first=True)
            for k in range(args.layers)
        )
        self.lstm_dropout = nn.Dropout(args.lstm_dropout)  # between layers
        width = 2 * args.hidden  # forward and backward outputs side by side
        # Attention pooling: one learned score per time step, softmax over T, weighted sum of the outputs.
        self.attention = nn.Linear(width, 1) if args.pooling == "attention" else None
        self.dropout = nn.Dropout(args.dropout)
        self.verb_head = nn.Linear(width, args.n_verbs)
        self.noun_head = nn.Linear(width, args.n_nouns)
        self.compute_dtype = torch.float32  # the LSTM's dtype (module docstring); an attribute, not state

    @torch.no_grad()
    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store the training split's per-dimension mean and std (std clamped away from 0)."""
        if mean.shape != self.feature_mean.shape or std.shape != self.feature_std.shape:
            raise ValueError(
                f"feature stats must have shape ({self.args.input_dim},), got {tuple(mean.shape)} and {tuple(std.shape)}"
            )
        self.feature_mean.copy_(mean.float())
        self.feature_std.copy_(std.float().clamp(min=1e-6))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, T, D), any float dtype -> (verb_logits (B, Cv), noun_logits (B, Cn))."""
        x = (features.float() - self.feature_mean) / self.feature_std  # (B, T, D) float32, standardised
        outputs = self._run_lstm(x).float()  # (B, T, 2H): [forward_t, backward_t] at every step
        pooled = self._pool(outputs)  # (B, 2H)
        pooled = self.dropout(pooled)
        return self.verb_head(pooled), self.noun_head(pooled)  # (B, Cv), (B, Cn)

    def _run_lstm(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) float32 -> the last layer's outputs (B, T, 2H) computed in ``compute_dtype``."""
        dtype = self.compute_dtype
        # Explicit casts with autocast off (CUDA's would recast the RNN to float16); float32 runs as it is called.
        with torch.autocast(x.device.type, enabled=False) if dtype != torch.float32 else contextlib.nullcontext():
            x = x.to(dtype)
            for k, layer in enumerate(self.lstm):
                if k:
                    x = self.lstm_dropout(x)  # (B, T, 2H), from torch's RNG
                x = _run_layer(layer, x, dtype)  # (B, T, 2H)
        return x

    def _pool(self, outputs: torch.Tensor) -> torch.Tensor:
        pooling = self.args.pooling
        if pooling == "mean":
            return outputs.mean(dim=1)  # (B, 2H)
        if pooling == "max":
            return outputs.amax(dim=1)  # (B, 2H)
        if pooling == "last":
            # Each direction's *final* state: the forward pass ends at step T-1, the backward pass at step 0,
            # so both halves have read the whole sequence.
            hidden = self.args.hidden
            forward_last = outputs[:, -1, :hidden]  # (B, H)
            backward_last = outputs[:, 0, hidden:]  # (B, H)
            return torch.cat([forward_last, backward_last], dim=1)  # (B, 2H)
        scores = self.attention(outputs)  # (B, T, 1)
        weights = torch.softmax(scores.float(), dim=1).to(outputs.dtype)  # (B, T, 1), sums to 1 over T
        return (weights * outputs).sum(dim=1)  # (B, 2H)


def _run_layer(layer: nn.LSTM, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (B, T, D') in ``dtype`` -> (B, T, 2H): the layer with its fp32 weights cast to ``dtype`` (gradients flow
    back to them), as views of one new buffer in parameter order. That is the layout cuDNN keeps an LSTM's weights
    in, so it uses them where they are instead of warning that they are not one contiguous chunk and copying them."""
    if dtype == torch.float32:
        return layer(x)[0]
    params = dict(layer.named_parameters())
    flat = torch.cat([p.to(dtype).reshape(-1) for p in params.values()])  # (sum of numels,) one buffer
    parts = flat.split([p.numel() for p in params.values()])
    weights = {name: part.view(p.shape) for (name, p), part in zip(params.items(), parts)}
    return torch.func.functional_call(layer, weights, (x,))[0]


def create_temporal_model(
    args: TemporalModelArgs, feature_mean: torch.Tensor | None = None, feature_std: torch.Tensor | None = None
) -> TemporalModel:
    """Build a ``TemporalModel``; pass the training split's feature mean/std (``feature_stats``) to standardise."""
    model = TemporalModel(args)
    if (feature_mean is None) != (feature_std is None):
        raise ValueError("pass both feature_mean and feature_std, or neither")
    if feature_mean is not None:
        model.set_feature_stats(feature_mean, feature_std)
    return model
