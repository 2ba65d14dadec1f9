"""Capture and restore the process's global RNG states (python ``random``, numpy, torch CPU and CUDA)
as objects that ``torch.load(weights_only=True)`` accepts: tensors, ints, floats, strs and lists.

Only the calling process is captured. With several ranks each rank has its own streams; a trainer that
wants them back exactly gathers one dict per rank (or derives its randomness from counters instead).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def capture_rng_state() -> dict[str, Any]:
    """Snapshot of all global RNGs.

    Returns ``{"python": {...}, "numpy": {...}, "torch": uint8 tensor, "cuda": [uint8 tensor per device]}``
    (``"cuda"`` only when CUDA is available). MT19937 keys are stored as int64 tensors of shape (624,)
    (python's with the position appended, shape (625,)).
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": None if py_gauss is None else float(py_gauss),
        },
        "numpy": {
            "bit_generator": str(np_name),
            "key": torch.from_numpy(np_key.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state().clone(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (also accepts its output after a checkpoint round trip).

    A saved CUDA state is restored for ``min(saved, visible)`` devices; a different device count (a resume
    on another topology) is logged, since those streams cannot be carried over exactly.
    """
    missing = {"python", "numpy", "torch"} - state.keys()
    if missing:
        raise KeyError(f"RNG state lacks {sorted(missing)}; expected the dict from capture_rng_state()")
    py = state["python"]
    internal = tuple(int(v) for v in py["internal"].tolist())
    random.setstate((int(py["version"]), internal, py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["bit_generator"],
            npy["key"].numpy().astype(np.uint32),
            int(npy["pos"]),
            int(npy["has_gauss"]),
            float(npy["cached_gaussian"]),
        )
    )
    torch.set_rng_state(state["torch"].to(device="cpu", dtype=torch.uint8))
    saved_cuda = state.get("cuda")
    if saved_cuda is None:
        return
    if not torch.cuda.is_available():
        logger.warning("checkpoint holds %d CUDA RNG states but CUDA is not available; not restored", len(saved_cuda))
        return
    visible = torch.cuda.device_count()
    if visible != len(saved_cuda):
        logger.warning(
            "checkpoint holds %d CUDA RNG states, %d devices visible; restoring the first %d",
            len(saved_cuda), visible, min(visible, len(saved_cuda)),
        )  # fmt: skip
    for device, cuda_state in enumerate(saved_cuda[:visible]):
        torch.cuda.set_rng_state(cuda_state.to(device="cpu", dtype=torch.uint8), device)
