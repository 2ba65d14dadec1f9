"""Semantic segmentation on a pretrained backbone: feature maps -> light decoder -> per-pixel classes.

``config`` (the recipe schema), ``decoders`` (linear and FPN heads), ``model`` (backbone + decoder with layer-wise
lr decay), ``transforms`` (joint image / mask augmentation), ``stream`` (resumable shuffled batches of pairs),
``metrics`` (confusion matrix, mIoU), ``inference`` (whole-image and sliding-window prediction), ``loop`` (the run).
The command line is :mod:`ssl_vil.eval.segment` (``python eval/segment.py``).
"""
