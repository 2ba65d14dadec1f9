"""Objective-side CPU costs vs lightly 1.6.0, measured side by side in one run.

    python bench/objectives.py [--repeats 5] [--threads 2]

1. Masks for 128 global crops on a 14x14 grid (DINOv2 stratified block masks): ``ssl_vil.objectives.masking.sample_masks``
   + static index buffers vs ``lightly.models.utils.random_block_mask``.
2. Multi-crop augmentation of one 320x256 RGB image into 2x224 + 8x96 views: ``build_multicrop("dino")`` vs
   lightly ``DINOTransform(n_local_views=8)`` (same probabilities and jitter magnitudes).
3. DINO loss on 2 global + 8 local views, B=32, K=65,536: centered teacher softmax + cross-entropy + center
   accumulation vs lightly ``DINOLoss``.
Prints best-of wall times and ours / lightly ratios (< 1 = ours faster).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from lightly.loss import DINOLoss
from lightly.models.utils import random_block_mask
from lightly.transforms import DINOTransform
from PIL import Image

from ssl_vil.augment import build_multicrop
from ssl_vil.losses import EMACenter, centered_teacher_probs, dino_cross_entropy
from ssl_vil.objectives.masking import BlockMaskGenerator, mask_index_buffers, sample_masks


def best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def report(name: str, ours: float, theirs: float) -> None:
    print(f"{name:<42} ours {ours * 1e3:9.2f} ms   lightly {theirs * 1e3:9.2f} ms   ratio {ours / theirs:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    blocks = BlockMaskGenerator((14, 14))

    def ours_masks() -> None:
        masks, upper = sample_masks(128, gen, blocks)
        mask_index_buffers(masks, upper)

    report(
        "block masks, 128 crops, 14x14",
        best_of(ours_masks, args.repeats),
        best_of(lambda: random_block_mask((128, 14, 14), max_num_masks_per_block=98), args.repeats),
    )

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 320, 3), dtype=np.uint8))
    ours_aug = build_multicrop("dino")
    theirs_aug = DINOTransform(n_local_views=8)
    report(
        "multi-crop 2x224 + 8x96, one image",
        best_of(lambda: ours_aug(image, gen), args.repeats),
        best_of(lambda: theirs_aug(image), args.repeats),
    )

    k, batch = 65536, 32
    student = torch.randn(10 * batch, k, generator=gen)
    teacher = torch.randn(2 * batch, k, generator=gen)
    center = EMACenter(k)
    lightly_loss = DINOLoss(output_dim=k)

    def ours_loss() -> None:
        probs = centered_teacher_probs(teacher, center.center, 0.04)
        center.accumulate(teacher)
        dino_cross_entropy(student, probs, n_student_views=10, n_teacher_views=2)

    report(
        "DINO loss, 10 views x 32 x 65536",
        best_of(ours_loss, args.repeats),
        best_of(lambda: lightly_loss(list(teacher.chunk(2)), list(student.chunk(10)), teacher_temp=0.04), args.repeats),
    )


if __name__ == "__main__":
    main()
