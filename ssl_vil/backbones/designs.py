"""ViL block designs (v2 layout) and ``python -m ssl_vil.backbones.designs``: parameters and FLOPs per design.

A ``VisionLSTM2`` of depth N has N block pairs, i.e. 2N pre-norm residual sub-blocks; the design says which
traversals of the h x w patch grid the mLSTM of each sub-block makes (the Vision-LSTM paper's block-design
ablation, spec section 7.4):

=============== ========================================================================= ==========================
design          traversals of each sub-block                                              parameters per direction
=============== ========================================================================= ==========================
``alternating`` sub-block 1: rows from the top left; sub-block 2: rows from the bottom right  (one direction each)
                (the official ViL; default, bit-identical to the released models)
``uni``         both sub-blocks: rows from the top left                                   (one direction each)
``bi``          every sub-block: rows from the top left + rows from the bottom right      separate
``bi_shared``   as ``bi``                                                                 shared
``quad``        every sub-block: rows both ways + columns both ways                       separate
``quad_shared`` as ``quad``                                                               shared
=============== ========================================================================= ==========================

How a multi-direction sub-block works (as the official training code's ``bidirectional`` / ``quaddirectional``
mLSTM layer): ``proj_up`` (and so the output gate z) and ``proj_down`` are computed once; each direction permutes
the inner sequence x_m into its traversal order, runs its own "mLSTM branch" (3x3 conv on the grid as seen in that
order -> SiLU -> q, k; v from x_m; mLSTM cell; + learnable skip), and permutes back; the branch outputs are summed,
gated by SiLU(z) and projected down. "Separate" gives every extra direction its own conv, q/k/v projections, cell
and skip (official ``sharedirs: false``, the default of its bidirectional and quad-directional configs); "shared"
reuses the first direction's (``sharedirs: true``), so ``bi_shared`` / ``quad_shared`` have the parameters of
``alternating``. ``quad`` follows the official quad-directional benchmark config (separate parameters); the shared
variant is ``quad_shared``. Column traversals convolve the transposed grid (the official quad layer used a causal
1-D conv there, v1 style; the v2 layout keeps its 3x3 grid conv for every direction).

This module imports no torch until the command runs (``--help`` stays fast); the config schema reads its names.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Literal

from ssl_vil.infra.cli_errors import HelpFormatter, add_version, user_errors

# One traversal of the h x w grid: rows top-left -> bottom-right (row-major order), the reverse of it (a 180 degree
# rotation of the grid), columns top-left -> bottom-right (column-major order, the transposed grid), its reverse.
Traversal = Literal["row_fwd", "row_bwd", "col_fwd", "col_bwd"]
TRAVERSALS: tuple[Traversal, ...] = ("row_fwd", "row_bwd", "col_fwd", "col_bwd")

BlockDesign = Literal["alternating", "uni", "bi", "bi_shared", "quad", "quad_shared"]
BLOCK_DESIGNS: tuple[BlockDesign, ...] = ("alternating", "uni", "bi", "bi_shared", "quad", "quad_shared")
DEFAULT_BLOCK_DESIGN: BlockDesign = "alternating"


@dataclass(frozen=True)
class SubBlockLayout:
    """One residual sub-block of a pair: its module name and the traversals its mLSTM layer makes."""

    name: str
    directions: tuple[Traversal, ...]
    share_directions: bool = False


def check_block_design(design: str) -> BlockDesign:
    """``design`` if it is one of :data:`BLOCK_DESIGNS`, else ``ValueError`` naming the allowed values."""
    if design not in BLOCK_DESIGNS:
        raise ValueError(f"block_design must be one of {', '.join(BLOCK_DESIGNS)}; got {design!r}")
    return design  # type: ignore[return-value]


def pair_layout(design: str) -> tuple[SubBlockLayout, SubBlockLayout]:
    """The two sub-blocks of a v2 block pair for ``design``.

    ``alternating`` keeps the official module names (``rowwise_from_top_left`` / ``rowwise_from_bot_right``), so
    its state-dict keys are those of the released checkpoints; the other designs name their sub-blocks ``first``
    / ``second`` (their keys never match an alternating checkpoint, which is the point: loading one into the
    other fails loudly instead of mixing traversals).
    """
    design = check_block_design(design)
    if design == "alternating":
        return SubBlockLayout("rowwise_from_top_left", ("row_fwd",)), SubBlockLayout("rowwise_from_bot_right",
                                                                                     ("row_bwd",))
    directions: tuple[Traversal, ...] = {
        "uni": ("row_fwd",),
        "bi": ("row_fwd", "row_bwd"),
        "bi_shared": ("row_fwd", "row_bwd"),
        "quad": TRAVERSALS,
        "quad_shared": TRAVERSALS,
    }[design]
    shared = design.endswith("_shared")
    return SubBlockLayout("first", directions, shared), SubBlockLayout("second", directions, shared)


# ------------------------------------------------------------------------------------------------- the command
PROG = "python -m ssl_vil.backbones.designs"


def design_costs(model: str, img_size: int, designs: tuple[str, ...] = BLOCK_DESIGNS) -> list[dict[str, object]]:
    """Per design: ``{"design", "params", "block_params", "gflops"}`` of the timm ``model`` (no classifier) at
    ``img_size`` px. FLOPs are those ``torch.utils.flop_counter.FlopCounterMode`` counts for one image's forward
    (matmuls and convolutions, 2 FLOPs per multiply-add; element-wise ops are not counted), on the meta device, so
    no memory is allocated and no arithmetic runs."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import ssl_vil.backbones  # noqa: F401  (registers the ViL models)

    rows: list[dict[str, object]] = []
    for design in designs:
        with torch.device("meta"):
            net = timm.create_model(model, pretrained=False, num_classes=0, img_size=img_size, block_design=design)
            image = torch.empty(1, 3, img_size, img_size)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            net(image)
        rows.append({
            "design": design,
            "params": sum(p.numel() for p in net.parameters()),
            "block_params": sum(p.numel() for p in net.blocks.parameters()),
            "gflops": counter.get_total_flops() / 1e9,
        })
    return rows


def format_table(rows: list[dict[str, object]], model: str, img_size: int) -> str:
    lines = [f"{model} at {img_size} px, no classifier; FLOPs per image (FlopCounterMode: matmul + conv)",
             f"{'design':<12} {'params':>12} {'in blocks':>12} {'GFLOPs':>8}"]
    for row in rows:
        lines.append(f"{row['design']:<12} {row['params']:>12,} {row['block_params']:>12,} {row['gflops']:>8.3f}")
    return "\n".join(lines)


@user_errors(PROG)
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, formatter_class=HelpFormatter,
                                 description="Parameter and FLOP counts of every ViL block design (v2 models)")
    add_version(ap)
    ap.add_argument("--model", default="vil2_tiny_patch16_224", help="a registered vil2_* timm model")
    ap.add_argument("--img-size", type=int, default=224, help="input resolution in pixels")
    ap.add_argument("--design", action="append", choices=BLOCK_DESIGNS, dest="designs",
                    help="only this design (repeatable; default: all)")
    args = ap.parse_args(argv)
    from ssl_vil.backbones import MODEL_NAMES  # a plain tuple: no torch import

    v2_models = [name for name in MODEL_NAMES if name.startswith("vil2_")]
    if args.model not in v2_models:
        ap.error(f"--model: block designs exist for the v2 models only ({', '.join(v2_models)}), got {args.model!r}")
    if args.img_size <= 0:
        ap.error(f"--img-size: expected a positive number of pixels, got {args.img_size}")
    designs = tuple(args.designs) if args.designs else BLOCK_DESIGNS
    print(format_table(design_costs(args.model, args.img_size, designs), args.model, args.img_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
