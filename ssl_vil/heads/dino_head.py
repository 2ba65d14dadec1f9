"""DINO-style projection head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes.

The prototype layer uses ``torch.nn.utils.parametrizations.weight_norm`` rather than the deprecated
hook-based ``torch.nn.utils.weight_norm``: the hook version stores a non-leaf ``weight`` attribute, which
makes ``copy.deepcopy`` raise and is a graph-break hazard under ``torch.compile``. The parametrization keeps
``g`` (``original0``, shape (K, 1)) and ``v`` (``original1``, shape (K, bottleneck_dim)) as leaves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from ssl_vil.config.engine import Config
from ssl_vil.config.errors import invalid

# Name fragment that marks the prototype layer's parameters (used by the optimizer param-group builder to
# zero its learning rate for the first steps).
LAST_LAYER_NAME = "last_layer"


@dataclass(kw_only=True, slots=True)
class DINOHeadConfig(Config):
    """Hyper-parameters of a :class:`DINOHead` (the input dimension comes from the backbone).

    Attributes:
        out_dim: number of prototypes K.
        hidden_dim: width of the hidden MLP layers.
        bottleneck_dim: width of the L2-normalised bottleneck in front of the prototypes.
        n_layers: number of Linear layers in the MLP (1 = a single Linear into the bottleneck).
        batch_norm: BatchNorm1d after every hidden Linear (needed on tiny / low-diversity data to avoid
            collapse; off in the ImageNet recipes).
        norm_last_layer: freeze the weight-norm gain g at 1 (DINO's ``norm_last_layer=True``).
        l2_eps: eps of the bottleneck L2 normalisation (fp16-safe default).
    """

    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    n_layers: int = 3
    batch_norm: bool = False
    norm_last_layer: bool = True
    l2_eps: float = 1e-6

    def validate(self) -> None:
        for name in ("out_dim", "hidden_dim", "bottleneck_dim", "n_layers"):
            value = getattr(self, name)
            if value < 1:
                raise invalid(name, value, "a positive integer")
        if not self.l2_eps > 0:
            raise invalid("l2_eps", self.l2_eps, "a positive float")


class DINOHead(nn.Module):
    """Projection head mapping features (N, in_dim) to prototype logits (N, K).

    ``mlp`` -> L2-normalise -> ``last_layer`` (weight-normalised Linear without bias). Works on any number
    of leading rows, including pooled tokens (B, in_dim) and gathered masked patch tokens (M, in_dim).
    """

    def __init__(self, in_dim: int, cfg: DINOHeadConfig | None = None) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else DINOHeadConfig()
        if not isinstance(in_dim, int) or in_dim < 1:
            raise ValueError(f"DINOHead in_dim must be a positive int, got {in_dim!r}")
        self.in_dim = in_dim
        self.out_dim = cfg.out_dim
        self.bottleneck_dim = cfg.bottleneck_dim
        self.has_batch_norm = cfg.batch_norm and cfg.n_layers > 1
        self.l2_eps = cfg.l2_eps

        layers: list[nn.Module] = []
        if cfg.n_layers == 1:
            layers.append(nn.Linear(in_dim, cfg.bottleneck_dim))
        else:
            dims = [in_dim] + [cfg.hidden_dim] * (cfg.n_layers - 1)
            for d_in, d_out in zip(dims[:-1], dims[1:]):
                layers.append(nn.Linear(d_in, d_out))
                if cfg.batch_norm:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
            layers.append(nn.Linear(cfg.hidden_dim, cfg.bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.apply(_init_linear)

        last = nn.Linear(cfg.bottleneck_dim, cfg.out_dim, bias=False)
        nn.init.trunc_normal_(last.weight, std=0.02)
        self.last_layer = weight_norm(last, dim=0)
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        # Frozen g = every prototype has unit norm, so logits are cosine similarities in [-1, 1].
        gain.requires_grad_(not cfg.norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, in_dim) -> logits (N, K)."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"DINOHead expects inputs (..., {self.in_dim}), got {tuple(x.shape)}")
        z = self.mlp(x)
        z = F.normalize(z, dim=-1, p=2.0, eps=self.l2_eps)
        return self.last_layer(z)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
