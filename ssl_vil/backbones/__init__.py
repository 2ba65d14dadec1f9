"""Vision-LSTM backbones (v1 and v2), mLSTM backends, pooling, weight loading and timm registration.

Importing this package (like any part of ``ssl_vil``) registers the timm models
``vil2_{tiny,small,base}_patch16_224`` and ``vil_{tiny,tinyplus,small,smallplus,base}_patch16_224`` once timm is
imported (see :mod:`ssl_vil`); its names load on first use.
"""

from typing import TYPE_CHECKING

from ssl_vil.infra.lazy_exports import lazy_getattr

if TYPE_CHECKING:
    from ssl_vil.backbones.mlstm_cell import MLSTM_BACKENDS, mlstm
    from ssl_vil.backbones.chunkwise_form import mlstm_chunkwise
    from ssl_vil.backbones.parallel_form import mlstm_parallel
    from ssl_vil.backbones.pooling import POOLING_KINDS, canonical_pooling, pool_tokens, pooled_dim
    from ssl_vil.backbones.vision_lstm import VisionLSTM, VisionLSTM2
    from ssl_vil.backbones.weights import (
        LoadReport,
        WeightLoadError,
        checkpoint_filter_fn,
        convert_state_dict,
        load_backbone_weights,
    )

# Loaded on first use (``ssl_vil.backbones.pooling`` alone does not pay for timm); the timm models are registered
# by ``import ssl_vil`` (now if timm is imported, else right after timm's import).
_LAZY = {
    "LoadReport": "ssl_vil.backbones.weights",
    "MLSTM_BACKENDS": "ssl_vil.backbones.mlstm_cell",
    "POOLING_KINDS": "ssl_vil.backbones.pooling",
    "VisionLSTM": "ssl_vil.backbones.vision_lstm",
    "VisionLSTM2": "ssl_vil.backbones.vision_lstm",
    "WeightLoadError": "ssl_vil.backbones.weights",
    "canonical_pooling": "ssl_vil.backbones.pooling",
    "checkpoint_filter_fn": "ssl_vil.backbones.weights",
    "convert_state_dict": "ssl_vil.backbones.weights",
    "load_backbone_weights": "ssl_vil.backbones.weights",
    "mlstm": "ssl_vil.backbones.mlstm_cell",
    "mlstm_chunkwise": "ssl_vil.backbones.chunkwise_form",
    "mlstm_parallel": "ssl_vil.backbones.parallel_form",
    "pool_tokens": "ssl_vil.backbones.pooling",
    "pooled_dim": "ssl_vil.backbones.pooling",
}

MODEL_NAMES = (
    "vil2_tiny_patch16_224",
    "vil2_small_patch16_224",
    "vil2_base_patch16_224",
    "vil_tiny_patch16_224",
    "vil_tinyplus_patch16_224",
    "vil_small_patch16_224",
    "vil_smallplus_patch16_224",
    "vil_base_patch16_224",
)

__all__ = [
    "MLSTM_BACKENDS",
    "MODEL_NAMES",
    "POOLING_KINDS",
    "LoadReport",
    "VisionLSTM",
    "VisionLSTM2",
    "WeightLoadError",
    "canonical_pooling",
    "checkpoint_filter_fn",
    "convert_state_dict",
    "load_backbone_weights",
    "mlstm",
    "mlstm_chunkwise",
    "mlstm_parallel",
    "pool_tokens",
    "pooled_dim",
]


__getattr__ = lazy_getattr(__name__, _LAZY)
