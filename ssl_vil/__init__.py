"""ssl_vil: self-supervised pretraining (DINO / iBOT / DINOv2) for Vision-LSTM backbones.

``import ssl_vil`` registers the ViL models with timm (``timm.create_model("vil2_small_patch16_224")``) without
paying for torch and timm itself: when timm is already imported the models are registered now, otherwise right
after timm's own import finishes. That keeps every command's ``--help`` and config check fast.
"""

import sys

__version__ = "0.1.0"


def _register_models() -> None:
    import ssl_vil.backbones.timm_models  # noqa: F401  (the timm ``@register_model`` entrypoints)


if "timm" in sys.modules:
    _register_models()
else:
    from ssl_vil.infra.after_import import call_after_import

    call_after_import("timm", _register_models)
