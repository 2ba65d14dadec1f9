"""The chunkwise mLSTM computes the same function (and gradients) as the official parallel form."""

from __future__ import annotations

import pytest
import torch

from ssl_vil.backbones import VisionLSTM, VisionLSTM2, mlstm, mlstm_chunkwise, mlstm_parallel
from ssl_vil.backbones.chunkwise_form import chunk_layout

SEQ_LENS = (16, 36, 49, 196, 200)


def _inputs(seqlen: int, dtype: torch.dtype, gate_std: float = 2.0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    batch, heads, head_dim = 2, 4, 8
    q, k, v = (torch.randn(batch, heads, seqlen, head_dim, generator=gen, dtype=dtype) for _ in range(3))
    igate = torch.randn(batch, heads, seqlen, generator=gen, dtype=dtype) * gate_std
    fgate = torch.randn(batch, heads, seqlen, generator=gen, dtype=dtype) * gate_std + 3.0
    return [t.requires_grad_() for t in (q, k, v, igate, fgate)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / b.abs().max()).detach())


def test_chunk_layout_minimises_padding():
    assert chunk_layout(196, 64) == (4, 49)
    assert chunk_layout(3136, 64) == (49, 64)
    assert chunk_layout(784, 64) == (13, 61)
    assert chunk_layout(16, 64) == (1, 16)
    assert chunk_layout(200, 8) == (25, 8)
    with pytest.raises(ValueError, match="positive"):
        chunk_layout(0, 8)


@pytest.mark.parametrize("seqlen", SEQ_LENS)
def test_chunkwise_matches_parallel_fp64_forward_and_gradients(seqlen):
    inputs = _inputs(seqlen, torch.float64)
    weight = torch.randn(2, 4, seqlen, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    reference = mlstm_parallel(*inputs)
    ref_grads = torch.autograd.grad((reference * weight).sum(), inputs)
    for chunk_size in (5, 8, 64):  # several chunks with end padding, exact divisors, a single chunk
        out = mlstm_chunkwise(*inputs, chunk_size=chunk_size)
        grads = torch.autograd.grad((out * weight).sum(), inputs)
        assert _rel(out, reference) <= 1e-10, chunk_size
        for grad, ref in zip(grads, ref_grads):
            assert torch.isfinite(grad).all()
            assert _rel(grad, ref) <= 1e-10, chunk_size


@pytest.mark.parametrize("seqlen", (49, 200))
def test_chunkwise_matches_parallel_fp32_round_off(seqlen):
    inputs = _inputs(seqlen, torch.float32, gate_std=1.0)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    exact = mlstm_parallel(*inputs64)
    exact_grads = torch.autograd.grad(exact.sum(), inputs64)
    parallel = mlstm_parallel(*inputs)
    parallel_grads = torch.autograd.grad(parallel.sum(), inputs)
    chunkwise = mlstm_chunkwise(*inputs, chunk_size=16)
    chunkwise_grads = torch.autograd.grad(chunkwise.sum(), inputs)
    # Both fp32 forms sit within fp32 round-off of the fp64 result, and of each other.
    assert _rel(chunkwise, parallel) < 1e-5
    assert _rel(chunkwise.double(), exact) < 1e-5
    for grad, pgrad, egrad in zip(chunkwise_grads, parallel_grads, exact_grads):
        assert _rel(grad, pgrad) < 1e-4
        assert _rel(grad.double(), egrad) < 1e-4


def test_auto_backend_dispatch_and_unknown_name():
    inputs = [t.detach() for t in _inputs(20, torch.float64)]
    torch.testing.assert_close(mlstm(*inputs, backend="auto"), mlstm_parallel(*inputs), atol=0, rtol=0)
    torch.testing.assert_close(mlstm(*inputs, backend="chunkwise", chunk_size=7),
                               mlstm_chunkwise(*inputs, chunk_size=7), atol=0, rtol=0)
    with pytest.raises(ValueError, match="mlstm_backend"):
        mlstm(*inputs, backend="triton")


GRIDS = {16: (4, 4), 36: (6, 6), 49: (7, 7), 196: (14, 14), 200: (10, 20)}


@pytest.mark.parametrize("seqlen", SEQ_LENS)
@pytest.mark.parametrize("cls", (VisionLSTM2, VisionLSTM))
def test_model_chunkwise_gradients_match_parallel_fp64(cls, seqlen):
    """Whole-model forward and every parameter's gradient: chunkwise == parallel to 1e-10 relative (fp64)."""
    torch.set_num_threads(1)
    height, width = GRIDS[seqlen]
    torch.manual_seed(0)
    model = cls(img_size=(2 * height, 2 * width), patch_size=2, dim=16, depth=2, num_classes=3,
                legacy_norm=True, mlstm_backend="parallel", mlstm_chunk_size=8).double()
    with torch.no_grad():  # move off the zero / constant official init so that every path matters
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    image = torch.randn(2, 3, 2 * height, 2 * width, dtype=torch.float64)

    def run(backend: str):
        model.set_mlstm_backend(backend)
        model.zero_grad()
        out = model(image)
        (out * torch.arange(1, 4, dtype=torch.float64)).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out_p, grads_p = run("parallel")
    out_c, grads_c = run("chunkwise")
    assert _rel(out_c, out_p) <= 1e-10
    for name, grad in grads_p.items():
        assert torch.isfinite(grads_c[name]).all(), name
        assert grad.abs().max() > 0, name
        assert _rel(grads_c[name], grad) <= 1e-10, name
