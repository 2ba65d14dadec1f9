"""What may go into a checkpoint file, and how it is turned into bytes and back.

Files are read with ``torch.load(..., weights_only=True)``, which refuses arbitrary pickled objects. A
payload entry may therefore hold only tensors (incl. ``nn.Parameter``), ``dict`` / ``OrderedDict`` /
``list`` / ``tuple`` / ``set``, ``str`` / ``bytes`` / ``int`` / ``float`` / ``complex`` / ``bool`` / ``None``,
``torch.Size`` / ``torch.dtype`` / ``torch.device``, plus types registered with
``torch.serialization.add_safe_globals``. Model, optimizer and ``GradScaler`` state dicts qualify as they
are; numpy's RNG state holds an ``ndarray``, which is refused, so store RNG states as produced by
:func:`ssl_vil.checkpoint.capture_rng_state`. The check runs *before* anything is written, so an
unloadable checkpoint is reported at the first save, not at the resume weeks later.
"""

from __future__ import annotations

import io
import re
from collections import Counter, OrderedDict
from typing import Any

import torch

_CONTAINERS = (dict, OrderedDict, Counter, list, tuple, set)
_SCALARS = (str, bytes, bytearray, int, float, complex, bool, type(None), torch.Size, torch.device, torch.dtype)
_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _registered_safe_types() -> set[type]:
    types: set[type] = set()
    for entry in torch.serialization.get_safe_globals():
        obj = entry[0] if isinstance(entry, tuple) else entry
        if isinstance(obj, type):
            types.add(obj)
    return types


def check_weights_only_safe(obj: Any, where: str) -> None:
    """Raise ``TypeError`` naming the first path inside ``obj`` that ``weights_only`` loading would reject.

    Exact type checks on purpose: ``numpy.float64`` subclasses ``float`` yet pickles as a numpy global.
    """
    extra: set[type] | None = None
    seen: set[int] = set()
    stack: list[tuple[Any, str]] = [(obj, where)]
    while stack:
        value, path = stack.pop()
        kind = type(value)
        if kind in _SCALARS:
            continue
        if kind in _TENSORS:
            # Attributes set on a tensor are pickled with it (``_rebuild_from_type_v2``); check them too.
            stack.extend((item, f"{path}.{name}") for name, item in vars(value).items())
            continue
        if kind in _CONTAINERS:
            if id(value) in seen:
                continue
            seen.add(id(value))
            if isinstance(value, dict):
                for key, item in value.items():
                    stack.append((key, f"{path} key {key!r}"))
                    stack.append((item, f"{path}[{key!r}]"))
            else:
                stack.extend((item, f"{path}[{i}]") for i, item in enumerate(value))
            continue
        if extra is None:
            extra = _registered_safe_types()
        if kind in extra:
            continue
        raise TypeError(
            f"{path} is a {kind.__module__}.{kind.__qualname__}, which torch.load(weights_only=True) refuses; "
            "store tensors or plain python values instead (RNG states: ssl_vil.checkpoint.capture_rng_state)"
        )


def serialize(obj: Any) -> memoryview:
    """``torch.save`` ``obj`` into memory (so its hash and size are known before it reaches the disk).

    Returns a view of the buffer rather than a ``bytes`` copy: for a model-sized entry the copy costs
    about a fifth of the serialization time.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


def deserialize(data: bytes | memoryview, map_location: str | torch.device = "cpu") -> Any:
    """Inverse of :func:`serialize`; ``weights_only=True`` so a checkpoint cannot run code on load."""
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
# torch's load errors wrap the actual refusal in advice; the advice to retry with weights_only=False would
# let a checkpoint run arbitrary code, and the allow-listing hints are for code authors, not for resuming a run.
_ADVICE_RE = re.compile(
    r"weights_only`? (?:set to `?False|=\s*False)|weights_only=False|trusted source|trust the source|two options|"
    r"add_safe_globals|safe_globals\(|Check the documentation|file an issue|recommended steps|In PyTorch 2\.6",
    re.IGNORECASE,
)
_UNPICKLER_MARKER = "WeightsUnpickler error:"


def describe_load_failure(exc: BaseException) -> str:
    """One line saying why ``torch.load`` refused a file, without torch's advice (never "use weights_only=False")."""
    text = " ".join(_ANSI_RE.sub("", str(exc)).split())
    if _UNPICKLER_MARKER in text:
        text = text.split(_UNPICKLER_MARKER, 1)[1]
    sentences = re.split(r"(?<=[.:])\s+|\s+(?=Check the documentation|Please )", text)
    kept = " ".join(s for s in sentences if s.strip() and not _ADVICE_RE.search(s)).strip()
    return kept or type(exc).__name__
