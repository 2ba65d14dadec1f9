"""``torch.compile`` of the ViL backbone: no graph breaks in the forward, and the two crop resolutions of a
multi-crop step compile once each (alternating 32 px global / 16 px local batches never recompile per step)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch._dynamo.testing import CompileCounter

import ssl_vil  # noqa: F401  (registers the ViL models)


def tiny_vil() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vil2_tiny_patch16_224", patch_size=4, dim=64, depth=2, img_size=32, num_classes=0)


@pytest.mark.parametrize("size", [32, 16])
def test_backbone_forward_has_no_graph_break(size):
    model = tiny_vil().eval()
    explained = torch._dynamo.explain(model.forward_features)(torch.randn(2, 3, size, size))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_two_crop_sizes_compile_once_each_and_match_eager():
    torch._dynamo.reset()
    model = tiny_vil().train()
    counter = CompileCounter()
    compiled = torch.compile(model.forward_features, backend=counter)
    gen = torch.Generator().manual_seed(1)
    batches = {size: torch.randn(4, 3, size, size, generator=gen) for size in (32, 16)}
    for _ in range(3):  # three "steps", each a global and a local batch
        for size, x in batches.items():
            out = compiled(x)
            out.float().sum().backward()
            eager = model.forward_features(x)
            assert torch.allclose(out, eager, atol=1e-5), size
    assert counter.frame_count <= 2, f"{counter.frame_count} compilations for 2 input sizes: recompiling per step"
    # forward_features ends at the final norm; legacy_norm belongs to the pooled head path.
    grads = {n: p.grad for n, p in model.named_parameters() if not n.startswith("legacy_norm.")}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [n for n, g in grads.items()
                                                                                  if g is None]
