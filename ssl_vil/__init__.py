"""ssl_vil: self-supervised pretraining (DINO / iBOT / DINOv2) for Vision-LSTM backbones.

Importing the package registers the ViL models with timm (``timm.create_model("vil2_small_patch16_224")``).
"""

__version__ = "0.1.0"

from ssl_vil import backbones as backbones  # noqa: E402,F401  (registers the timm models)
