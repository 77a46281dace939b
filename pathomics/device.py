"""The one device and precision policy: which torch device and autocast dtype a stage runs on."""

from __future__ import annotations

import torch

from pathomics.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")  # "cuda:N" is accepted too
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def is_device_name(device: str) -> bool:
    """Whether ``device`` is one of ``DEVICES`` or ``cuda:N``."""
    return device in DEVICES or (device.startswith("cuda:") and device[5:].isdigit())


def resolve_device(device: str) -> torch.device:
    """``auto`` → the first GPU if CUDA is available, else the CPU; an unavailable or unknown device is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not is_device_name(device):
        raise ConfigError(f"device {device!r} is not one of cpu, cuda, cuda:N, auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device} asked for, but no CUDA device is visible; use --device cpu or auto")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX), where autocast bf16 is ~3x fp32, not emulated."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bf16 on GPUs that have it (else fp16), bf16 on CPUs with native bf16, else fp32."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"
