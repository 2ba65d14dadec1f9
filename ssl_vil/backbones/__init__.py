"""ViL backbones."""
