"""Identity of the weights an evaluation used (recorded next to every result), including a random init.

``--weights random:SPEC`` names the backbone of SPEC at random initialisation (seeded), the baseline a pretrained
backbone has to beat. SPEC is where the architecture comes from:

* a recipe or a run's ``config.yaml`` (``random:recipes/demo_digits.yaml``),
* a run directory (its ``config.yaml``; no checkpoint needed),
* an export's ``model.json``, or the exported weights file beside it,
* a registered timm model name with its default constructor arguments (``random:vil2_small_patch16_224``).

``--weights pixels:SPEC`` is the input baseline: the pixels SPEC's eval transform produces (size, crop,
normalisation), flattened, as the features; SPEC takes the same forms.

The identity of such weights is the sha256 of their safetensors serialisation (no metadata), i.e. the file hash
the same tensors would have if written with ``safetensors.torch.save_file``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ssl_vil.config.errors import ConfigError

_BLOCK_BYTES = 8 << 20
RANDOM_PREFIX = "random:"
PIXELS_PREFIX = "pixels:"
_EXPORT_INFO = "model.json"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK_BYTES):
            h.update(block)
    return h.hexdigest()


def weights_sha256(path: str | Path) -> str:
    """sha256 of a weights file; for a folder (checkpoint step folder), of its files' names and hashes in order."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such weights file or folder")
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\t{file_sha256(f)}\n".encode())
    return h.hexdigest()


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of ``safetensors.torch.save(state)``: equal to the hash of a ``save_file`` of the same tensors."""
    from safetensors.torch import save

    return hashlib.sha256(save({k: v.detach().contiguous() for k, v in state.items()})).hexdigest()


def is_random_init(weights: str | Path) -> bool:
    """True for a ``random:SPEC`` weights argument."""
    return isinstance(weights, str) and weights.startswith(RANDOM_PREFIX)


def random_init_info(weights: str) -> dict[str, Any]:
    """model.json-style info (``model``, ``kwargs``, ``img_size``, ``mean``, ``std``, ...) of ``random:SPEC``.

    Raises :class:`ConfigError` naming SPEC when it is none of the forms in the module docstring.
    """
    from ssl_vil.config import load_config
    from ssl_vil.export import model_info

    spec = weights[len(RANDOM_PREFIX):]
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return model_info(load_config(path, world_size=1))
    if path.is_dir() and (path / "config.yaml").is_file():
        return model_info(load_config(path / "config.yaml", world_size=1))
    if path.is_file() and path.name == _EXPORT_INFO:
        return json.loads(path.read_text())
    if path.is_file() and (path.parent / _EXPORT_INFO).is_file():
        return json.loads((path.parent / _EXPORT_INFO).read_text())
    import timm

    import ssl_vil  # noqa: F401  (registers the ViL models)

    if spec and not path.exists() and timm.is_model(spec):
        return {"model": spec, "kwargs": {}, "pooling": "bilateral_concat"}
    raise ConfigError(
        f"got {weights!r}, expected random:SPEC with SPEC a recipe / config .yaml file, a run directory holding "
        f"config.yaml, an export's {_EXPORT_INFO} (or the weights file beside it), or a timm model name",
        key="weights")


def random_init_backbone(weights: str, seed: int) -> tuple[nn.Module, dict[str, Any]]:
    """The backbone of ``random:SPEC`` initialised after ``torch.manual_seed(seed)`` (eval mode, no classifier)
    and its info, with ``source``, ``init_seed`` and ``weights_sha256`` (:func:`state_dict_sha256`) added.

    The global CPU RNG state is restored afterwards, so the caller's own seeding is unaffected.
    """
    from ssl_vil.export import build_backbone

    info = random_init_info(weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_backbone(info)
    _complete_data_info(info, net)
    info.update(source=f"{weights} (init seed {seed})", init_seed=seed,
                weights_sha256=state_dict_sha256(net.state_dict()))
    return net.eval(), info


def is_pixels(weights: str | Path) -> bool:
    """True for a ``pixels:SPEC`` weights argument."""
    return isinstance(weights, str) and weights.startswith(PIXELS_PREFIX)


class Pixels(nn.Module):
    """The input baseline's "backbone": ``forward_features`` (B, C, H, W) -> (B, C*H*W), the pixels themselves."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def pixel_baseline(weights: str) -> tuple[nn.Module, dict[str, Any]]:
    """:class:`Pixels` and the data info (``img_size``, ``mean``, ``std``, ``crop_pct``) of ``pixels:SPEC``: the
    pixels SPEC's backbone would see. ``weights_sha256`` is None: there are no weights."""
    from ssl_vil.export import build_backbone

    info = random_init_info(RANDOM_PREFIX + weights[len(PIXELS_PREFIX):])
    if "img_size" not in info or "mean" not in info:  # a timm name: its data config lives on the model
        with torch.random.fork_rng(devices=[]):
            _complete_data_info(info, build_backbone(info))
    info.update(source=weights, weights_sha256=None, pooling="pixels")
    return Pixels(), info


def _complete_data_info(info: dict[str, Any], net: nn.Module) -> None:
    """Fill ``img_size`` / ``mean`` / ``std`` that ``info`` lacks from ``net``'s timm data config."""
    cfg_data = getattr(net, "pretrained_cfg", {}) or {}
    info.setdefault("img_size", info["kwargs"].get("img_size", cfg_data.get("input_size", (3, 224, 224))[-1]))
    info.setdefault("mean", list(cfg_data.get("mean", (0.485, 0.456, 0.406))))
    info.setdefault("std", list(cfg_data.get("std", (0.229, 0.224, 0.225))))
