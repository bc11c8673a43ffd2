"""The stage-two models: standardise cached features, mark the context rows, a temporal head, verb and noun classifiers.

    features (B, L, D) ──► (x - mean) / std ──► + marker on ──► head ──► (B, W) ──► dropout ──► verb classifier (B, Cv)
                            (buffers, from the    context rows                                 └► noun classifier (B, Cn)
                             training split)

    lstm         the seed's 2-layer BiLSTM, its outputs pooled over the segment's rows (mean | max | last | attention)
    transformer  a pre-norm transformer encoder over the L rows with learned positions, mean over the segment's rows
    attentive    an attentive probe: learned queries cross-attend to the L rows (learned positions), then the classifiers
    mean         TSN: the classifiers applied to every row, their scores averaged over the L rows (blind to order)

A sequence is L = K + T + K rows: the segment's T, and K from its context before and after when the model was trained
with one (``TemporalModelArgs.context``; K = 0 otherwise); a learned vector added to the context rows tells every head
which rows they are. The standardisation lives in the model (buffers in its state dict), so whoever evaluates,
predicts or exports applies exactly the scaling it was trained with.

``compute_dtype`` (not saved) is what a head's temporal layers compute in; standardisation, pooling, the classifiers
and the losses stay float32. The BiLSTM takes explicit casts (CUDA's autocast would run an RNN in float16; see
``epicfeat.temporal.precision``); the attention heads run under autocast to ``compute_dtype`` (matmuls in it, layer
norms and softmax in float32), which also switches any outer autocast off for fp32. The BiLSTM is single-layer
BiLSTMs with ``nn.Dropout`` between them: every mask comes from torch's RNG (saved in last.pt; cuDNN's multi-layer
dropout has a state of its own), and on the CPU the numbers equal ``nn.LSTM(num_layers=2, dropout=p)``'s.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from epicfeat.configs import HEADS, POOLINGS, TrainTemporalConfig  # one list each, shared with the config
from epicfeat.temporal.data import Context


@dataclass(frozen=True, kw_only=True)
class TemporalModelArgs:
    """Everything needed to rebuild a temporal model (stored in every checkpoint); each head reads its own fields."""

    head: str = "lstm"  # lstm | transformer | attentive | mean
    input_dim: int = 2048  # feature size per row (ResNet50 pooled features)
    frames: int = 16  # T rows per segment: learned positions and the context layout are for exactly K + T + K rows
    context_seconds: float = 0.0  # the context the rows around a segment come from (0: none) ...
    context_frames: int = 0  # ... and K, the rows sampled from each side of it
    dropout: float = 0.5  # dropout on the pooled vector, before the classifiers
    n_verbs: int  # verb classes (97 on EPIC-100)
    n_nouns: int  # noun classes (300 on EPIC-100)
    # lstm
    hidden: int = 512  # LSTM hidden units per direction
    layers: int = 2  # stacked BiLSTM layers
    lstm_dropout: float = 0.3  # dropout between LSTM layers (none with one layer)
    pooling: str = "mean"  # how the segment's outputs become one vector: mean | max | last | attention
    # transformer, attentive
    width: int = 512  # rows are projected to this width
    depth: int = 2  # transformer encoder layers
    attention_heads: int = 8
    attention_dropout: float = 0.1  # inside the attention blocks (attention weights, residual branches)
    queries: int = 1  # the attentive probe's learned queries (their outputs concatenated)

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        for name in ("input_dim", "frames", "hidden", "layers", "width", "depth", "attention_heads", "queries",
                     "n_verbs", "n_nouns"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.attention_heads:
            raise ValueError(f"attention_heads ({self.attention_heads}) must divide width ({self.width})")
        Context(self.context_seconds, self.context_frames)  # refuses seconds without frames and the reverse

    @classmethod
    def of_config(cls, config: TrainTemporalConfig, *, input_dim: int, n_verbs: int, n_nouns: int) -> TemporalModelArgs:
        """The model a train-temporal config describes (its fields of the same names), for features of
        ``input_dim`` and these class counts."""
        named = {f.name for f in dataclasses.fields(cls)} - {"input_dim", "n_verbs", "n_nouns", "context_frames"}
        return cls(input_dim=input_dim, n_verbs=n_verbs, n_nouns=n_nouns,
                   context_frames=Context.of_config(config).frames, **{name: getattr(config, name) for name in named})

    @property
    def context(self) -> Context:
        return Context(self.context_seconds, self.context_frames)

    @property
    def sequence_length(self) -> int:
        """L = K + T + K: the rows per segment a head with a fixed layout reads."""
        return self.context.sequence_length(self.frames)

    @property
    def fixed_length(self) -> bool:
        """Whether the model reads exactly ``sequence_length`` rows: learned positions, or a context's layout (the
        BiLSTM and mean heads without context read any number of rows)."""
        return self.head in ("transformer", "attentive") or self.context_frames > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class TemporalModel(nn.Module):
    """What every head shares: standardisation, the context marker, dropout, the verb and noun classifiers.

    A head (a subclass) builds its layers, then its classifiers (``_classifiers``: after its layers, so a seed gives
    the BiLSTM the initial weights it always had), and defines ``forward_features``: standardised rows (B, L, D)
    float32 -> one vector per segment (B, W) float32.
    """

    def __init__(self, args: TemporalModelArgs):
        super().__init__()
        self.args = args
        # Per-dimension statistics of the training features; identity scaling until set_feature_stats is called.
        self.register_buffer("feature_mean", torch.zeros(args.input_dim))
        self.register_buffer("feature_std", torch.ones(args.input_dim))
        context = args.context.frames
        # Context rows get one learned vector added (zero at first): how every head tells them from the segment's.
        self.context_marker = nn.Parameter(torch.zeros(args.input_dim)) if context else None
        is_context = torch.zeros(args.sequence_length)  # (L,) 1 at the K rows on each side
        is_context[:context], is_context[len(is_context) - context:] = 1.0, 1.0
        self.register_buffer("is_context", is_context, persistent=False)
        self.dropout = nn.Dropout(args.dropout)
        self.compute_dtype = torch.float32  # what the head's temporal layers compute in; an attribute, not state

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
        """features (B, L, D), any float dtype -> (verb_logits (B, Cv), noun_logits (B, Cn)), float32."""
        pooled = self.dropout(self.forward_features(self.standardise(features)))  # (B, W)
        return self.verb_head(pooled), self.noun_head(pooled)  # (B, Cv), (B, Cn)

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, L, D) float32: standardised, the context rows marked."""
        length = self.args.sequence_length
        if self.args.fixed_length and features.shape[1] != length:
            raise ValueError(f"this {self.args.head} head reads {length} rows per segment (K + T + K = "
                             f"{self.args.context.frames} + {self.args.frames} + {self.args.context.frames}), "
                             f"got {features.shape[1]}")
        x = (features.float() - self.feature_mean) / self.feature_std  # (B, L, D)
        if self.context_marker is not None:
            x = x + self.is_context[:, None] * self.context_marker  # (L, 1) * (D,) -> (L, D), added to every segment
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised rows (B, L, D) -> pooled (B, W): what each head defines (BiLSTM, transformer, ...)."""
        raise NotImplementedError(f"{type(self).__name__} defines no forward_features")

    def segment(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, L, W) -> (B, T, W): the segment's own rows, between the K context rows on each side (constant bounds:
        converters of traced models fail on shape arithmetic)."""
        context = self.args.context.frames
        return rows[:, context:context + self.args.frames] if context else rows

    def _classifiers(self, width: int) -> None:
        self.verb_head = nn.Linear(width, self.args.n_verbs)
        self.noun_head = nn.Linear(width, self.args.n_nouns)


# ------------------------------------------------------------------------------------------------------ lstm
class BiLSTM(TemporalModel):
    """The seed's model: stacked BiLSTMs over the L rows, their outputs pooled over the segment's T."""

    def __init__(self, args: TemporalModelArgs):
        super().__init__(args)
        # One single-layer BiLSTM per layer (module docstring): layer k reads layer k - 1's (B, L, 2H) outputs.
        self.lstm = nn.ModuleList(
            nn.LSTM(input_size=args.input_dim if k == 0 else 2 * args.hidden, hidden_size=args.hidden,
                    bidirectional=True, batch_first=True)
            for k in range(args.layers)
        )
        self.lstm_dropout = nn.Dropout(args.lstm_dropout)  # between layers
        width = 2 * args.hidden  # forward and backward outputs side by side
        # Attention pooling: one learned score per time step, softmax over T, weighted sum of the outputs.
        self.attention = nn.Linear(width, 1) if args.pooling == "attention" else None
        self._classifiers(width)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self._run_lstm(x).float()  # (B, L, 2H): [forward_t, backward_t] at every step
        return self._pool(outputs)  # (B, 2H)

    def _run_lstm(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) float32 -> the last layer's outputs (B, L, 2H) computed in ``compute_dtype``."""
        dtype = self.compute_dtype
        # Explicit casts with autocast off (CUDA's would recast the RNN to float16); float32 runs as it is called.
        with torch.autocast(x.device.type, enabled=False) if dtype != torch.float32 else contextlib.nullcontext():
            x = x.to(dtype)
            for k, layer in enumerate(self.lstm):
                if k:
                    x = self.lstm_dropout(x)  # (B, L, 2H), from torch's RNG
                x = _run_layer(layer, x, dtype)  # (B, L, 2H)
        return x

    def _pool(self, outputs: torch.Tensor) -> torch.Tensor:
        pooling = self.args.pooling
        if pooling == "last":
            # Each direction's *final* state: the forward pass ends at step L-1, the backward pass at step 0,
            # so both halves have read the whole sequence (context included).
            hidden = self.args.hidden
            forward_last = outputs[:, -1, :hidden]  # (B, H)
            backward_last = outputs[:, 0, hidden:]  # (B, H)
            return torch.cat([forward_last, backward_last], dim=1)  # (B, 2H)
        outputs = self.segment(outputs)  # (B, T, 2H)
        if pooling == "mean":
            return outputs.mean(dim=1)  # (B, 2H)
        if pooling == "max":
            return outputs.amax(dim=1)  # (B, 2H)
        scores = self.attention(outputs)  # (B, T, 1)
        weights = torch.softmax(scores.float(), dim=1).to(outputs.dtype)  # (B, T, 1), sums to 1 over T
        return (weights * outputs).sum(dim=1)  # (B, 2H)


def _run_layer(layer: nn.LSTM, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (B, L, D') in ``dtype`` -> (B, L, 2H): the layer with its fp32 weights cast to ``dtype`` (gradients flow
    back to them), as views of one new buffer in parameter order. That is the layout cuDNN keeps an LSTM's weights
    in, so it uses them where they are instead of warning that they are not one contiguous chunk and copying them."""
    if dtype == torch.float32:
        return layer(x)[0]
    params = dict(layer.named_parameters())
    flat = torch.cat([p.to(dtype).reshape(-1) for p in params.values()])  # (sum of numels,) one buffer
    parts = flat.split([p.numel() for p in params.values()])
    weights = {name: part.view(p.shape) for (name, p), part in zip(params.items(), parts)}
    return torch.func.functional_call(layer, weights, (x,))[0]


# ------------------------------------------------------------------------------------------ attention heads
def _autocast(x: torch.Tensor, dtype: torch.dtype):
    """Autocast to ``dtype`` for an attention head's layers; off for float32 (even inside an outer autocast)."""
    return torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32)


def _positions(length: int, width: int) -> nn.Parameter:
    """Learned vectors, one per row of the sequence (or per query): (L, W), N(0, 1) cut at +-2. On the scale of
    the projected standardised rows: ViT's std 0.02 left the order of rows invisible to a short run (README)."""
    return nn.Parameter(nn.init.trunc_normal_(torch.empty(length, width), std=1.0, a=-2.0, b=2.0))


class Transformer(TemporalModel):
    """Rows projected to ``width`` plus learned positions, a pre-norm transformer encoder (torch's own layers),
    a final layer norm, the mean over the segment's rows."""

    def __init__(self, args: TemporalModelArgs):
        super().__init__(args)
        self.project = nn.Linear(args.input_dim, args.width)
        self.positions = _positions(args.sequence_length, args.width)
        layer = nn.TransformerEncoderLayer(args.width, args.attention_heads, dim_feedforward=4 * args.width,
                                           dropout=args.attention_dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        # Pre-norm layers leave their residual stream unnormalised: the encoder's last norm closes it.
        self.encoder = nn.TransformerEncoder(layer, args.depth, norm=nn.LayerNorm(args.width),
                                             enable_nested_tensor=False)
        self._classifiers(args.width)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        with _autocast(x, self.compute_dtype):
            tokens = self.encoder(self.project(x) + self.positions)  # (B, L, W) + (L, W) -> (B, L, W)
        return self.segment(tokens.float()).mean(dim=1)  # (B, T, W) -> (B, W)


class AttentiveProbe(TemporalModel):
    """V-JEPA's attentive probe: rows projected to ``width`` plus learned positions, ``queries`` learned queries
    that cross-attend to them (torch's nn.MultiheadAttention, pre-norm), an MLP on each query, the queries' outputs
    concatenated."""

    def __init__(self, args: TemporalModelArgs):
        super().__init__(args)
        width = args.width
        self.project = nn.Linear(args.input_dim, width)
        self.positions = _positions(args.sequence_length, width)
        self.queries = _positions(args.queries, width)  # (Q, W), learned like positions
        self.norm_rows = nn.LayerNorm(width)
        self.cross_attention = nn.MultiheadAttention(width, args.attention_heads, dropout=args.attention_dropout,
                                                     batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                 nn.Dropout(args.attention_dropout))
        self._classifiers(args.queries * width)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        with _autocast(x, self.compute_dtype):
            rows = self.norm_rows(self.project(x) + self.positions)  # (B, L, W)
            queries = self.queries.expand(len(x), -1, -1)  # (Q, W) -> (B, Q, W)
            attended = self.cross_attention(queries, rows, rows, need_weights=False)[0]  # (B, Q, W)
            queries = queries + attended
            queries = queries + self.mlp(self.norm_mlp(queries))  # (B, Q, W)
        return queries.float().flatten(1)  # (B, Q, W) -> (B, Q * W)


class MeanScores(TemporalModel):
    """TSN's consensus: the classifiers score every row, the scores are averaged over the rows. Averages cannot see
    the order of rows: the baseline every other head must beat on order-defined verbs."""

    def __init__(self, args: TemporalModelArgs):
        super().__init__(args)
        self._classifiers(args.input_dim)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.dropout(self.standardise(features))  # (B, L, D)
        return self.verb_head(rows).mean(dim=1), self.noun_head(rows).mean(dim=1)  # (B, L, C) -> (B, C)


_HEAD_CLASSES = {"lstm": BiLSTM, "transformer": Transformer, "attentive": AttentiveProbe, "mean": MeanScores}


def create_temporal_model(
    args: TemporalModelArgs, feature_mean: torch.Tensor | None = None, feature_std: torch.Tensor | None = None
) -> TemporalModel:
    """Build the head ``args`` name; pass the training split's feature mean/std (``feature_stats``) to standardise."""
    model = _HEAD_CLASSES[args.head](args)
    if (feature_mean is None) != (feature_std is None):
        raise ValueError("pass both feature_mean and feature_std, or neither")
    if feature_mean is not None:
        model.set_feature_stats(feature_mean, feature_std)
    return model
