"""The numeric precision a run computes in: ``auto`` resolved per device, and the matching autocast context.

``auto`` is bf16 autocast on CUDA and fp32 on CPU (CPU autocast is slow and changes numerics for no gain in the
small CPU runs); ``bf16`` / ``fp16`` autocast on whatever device they are asked for; ``fp32`` is no autocast.
Training, feature extraction and fine-tuning all take their autocast from here, so evaluation runs the teacher
in the precision it was trained in.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device | str) -> Precision:
    """``precision`` (one of :data:`PRECISIONS`) as it applies on ``device``: ``auto`` -> bf16 on CUDA, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision  # type: ignore[return-value]


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``; None for fp32 (no autocast)."""
    return _DTYPES.get(resolve_precision(precision, device))


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """A fresh context manager: ``torch.autocast`` in the resolved precision, or a no-op for fp32."""
    device = torch.device(device)
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
