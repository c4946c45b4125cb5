"""Which device a model runs or trains on, and what the CPU can compute natively."""

from __future__ import annotations


def choose_device(requested: str | None = None):
    import torch

    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX) rather than emulating it."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
