"""Vision-LSTM backbones (v1 and v2), mLSTM backends, pooling, weight loading and timm registration.

Importing this package registers the timm models ``vil2_{tiny,small,base}_patch16_224`` and
``vil_{tiny,tinyplus,small,smallplus,base}_patch16_224``.
"""

from ssl_vil.backbones import timm_models  # noqa: F401  (registers the timm models)
from ssl_vil.backbones.mlstm_cell import MLSTM_BACKENDS, mlstm
from ssl_vil.backbones.mlstm_chunkwise import mlstm_chunkwise
from ssl_vil.backbones.mlstm_parallel import mlstm_parallel
from ssl_vil.backbones.pooling import POOLING_KINDS, canonical_pooling, pool_tokens, pooled_dim
from ssl_vil.backbones.vision_lstm import VisionLSTM, VisionLSTM2
from ssl_vil.backbones.weights import (
    LoadReport,
    WeightLoadError,
    checkpoint_filter_fn,
    convert_state_dict,
    load_backbone_weights,
)

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
