"""Where and in which precision models run: one answer for every command."""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

from epicfeat.errors import EpicfeatError

# /proc/cpuinfo flags of CPUs that compute bf16 natively (Intel AMX tiles, AVX512-BF16 dot products).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")

#: What each precision name computes in (the backbone under autocast to it, an LSTM by explicit casts).
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``auto`` is the first CUDA GPU when there is one, else the CPU; ``cuda*`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EpicfeatError(f"--device {device} asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
    return torch.device(device)


@functools.lru_cache(maxsize=None)
def native_bf16_cpu(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when this CPU computes bf16 natively (flag ``amx_bf16`` or ``avx512_bf16`` in ``cpuinfo``); False when
    the file cannot be read (not Linux): fp32 is the safe choice."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is bf16 on a GPU and on a CPU with native bf16 (``native_bf16_cpu``), else fp32; others are kept."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" or (device.type == "cpu" and native_bf16_cpu()) else "fp32"


@contextlib.contextmanager
def cuda_settings(*, tf32: bool, cudnn_benchmark: bool) -> Iterator[None]:
    """TF32 (cuDNN convolutions and RNNs, CUDA matmuls) and cuDNN autotuning as given for the calls inside, then as
    they were: the flags are process-wide, and one left set would change what a later model computes."""
    backends = torch.backends
    previous = (backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32, backends.cudnn.benchmark)
    backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32, backends.cudnn.benchmark = tf32, tf32, cudnn_benchmark
    try:
        yield
    finally:
        backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32, backends.cudnn.benchmark = previous
