"""The precision stage two computes in: what ``precision: fp32 | bf16 | fp16 | auto`` means, on every device.

CUDA autocast runs RNNs in float16 whatever dtype it is given (without loss scaling), so the model casts the LSTM's
weights and input explicitly instead (``TemporalModel.compute_dtype``), with autocast off around it; the attention
heads run under autocast to the dtype asked for (autocast does what it says for them). fp32 master weights stay with
the optimiser. The same code runs on the CPU and on a GPU.

    fp32   everything in float32 (on a GPU, TF32 matmuls where torch allows them)
    bf16   the head's temporal layers in bfloat16 (the LSTM; the attention heads' matmuls, their layer norms and
           softmax in float32); standardisation, pooling, classifiers and losses in float32 (``mean`` has no such
           layers: it is float32 in every precision)
    fp16   the same in float16, with a GradScaler (loss scaling) so small gradients survive
    auto   bf16 on a GPU and on a CPU with native bf16 (AMX / AVX512-BF16), fp32 elsewhere
"""
from __future__ import annotations

import torch

from epicfeat.devices import PRECISION_DTYPES, resolve_precision
from epicfeat.temporal.model import TemporalModelArgs, create_temporal_model


def resolve_temporal_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA and on CPUs with native bf16, else ``fp32``; fp32 / bf16 / fp16 are kept."""
    resolved = resolve_precision(precision, device)
    if resolved not in PRECISION_DTYPES:
        raise ValueError(f"precision must be one of auto, {', '.join(PRECISION_DTYPES)}; got {precision!r}")
    return resolved


def recorded_precision(checkpoint) -> str:
    """The precision a checkpoint's run trained and validated in (its recorded config); what evaluate and predict
    run its LSTM in. Runs record the resolved value; a config saying ``auto`` (none of ours) reads as fp32."""
    recorded = str(checkpoint.config.get("precision", "fp32"))
    return recorded if recorded in PRECISION_DTYPES else "fp32"


def supported_precision(precision: str, device: torch.device) -> tuple[str, list[str]]:
    """(``precision`` if the LSTM trains in it on ``device``, else ``fp32``; a note saying why when it does not),
    found by a tiny model's forward/backward through training's casts (cuDNN runs bf16 LSTMs from 9.13 on). The
    LSTM is the head that can lack kernels: every head follows its answer."""
    dtype = PRECISION_DTYPES[precision]
    if dtype == torch.float32:
        return precision, []
    with torch.random.fork_rng(devices=[]):  # the probe's initial weights leave the run's RNG as it was
        args = TemporalModelArgs(input_dim=8, hidden=8, layers=1, dropout=0.0, n_verbs=2, n_nouns=2)
        probe = create_temporal_model(args).to(device)
    probe.compute_dtype = dtype
    try:
        verbs, nouns = probe(torch.ones(2, 3, 8, device=device))  # (2, 2), (2, 2)
        (verbs.sum() + nouns.sum()).backward()
        return precision, []
    except RuntimeError as err:
        return "fp32", [f"{precision} LSTMs do not run on {device} ({str(err).splitlines()[0]}); training in fp32"]


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (small gradients would flush to zero without it); a disabled no-op otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
