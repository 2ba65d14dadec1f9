"""The optional ``mlstm_kernels`` backend (NX-AI's mlstm-kernels package) computes our mLSTM: forward and gradient
parity with the parallel and chunkwise forms, the Triton layout (checked on CPU through the native kernel), a whole
ViL, backend resolution, the missing-package error and the run's environment record.

Tests that run the package skip (with the reason) when it is not installed; it is the optional extra
``ssl_vil[kernels]`` (NXAI Community Licence), which ``make`` installs.

Tolerances are max |a - b| / max |reference| (as in test_backbone_mlstm.py), about 10x the value measured on
the same inputs (all shapes and chunk sizes below); the comment by each table gives the measured maximum. On CPU
the package runs its native torch kernel with the max state starting at -inf, so the only differences from our
forms are summation order and chunking (the kernel's recurrent chunk states vs our cummax / fused recurrence; the
parallel form's global cumsums), i.e. round-off.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import timm
import torch

import ssl_vil.backbones  # noqa: F401  (registers the timm models)
from ssl_vil.backbones import mlstm_chunkwise, mlstm_parallel
from ssl_vil.backbones import kernels_form
from ssl_vil.backbones.kernels_form import NATIVE_KERNEL, TRITON_KERNEL, mlstm_kernels_form, plan_kernel, run_plan
from ssl_vil.backbones.mlstm_cell import AUTO_PARALLEL_MAX_TOKENS, MLSTM_BACKENDS, mlstm, resolve_backend
from ssl_vil.config import load_config
from ssl_vil.train.run_dir import mlstm_backend_record

SKIP_REASON = "optional extra ssl_vil[kernels] (mlstm-kernels, NXAI Community Licence) is not installed"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo_digits.yaml"
EPS = 1e-6

# (B, NH, S, DH): 64 = one chunk, 196 = not a multiple of 64 (4 chunks of 49), 257 = end padding (5 x 52 + 3).
SHAPES = ((2, 2, 64, 16), (2, 4, 196, 32), (2, 3, 257, 16))
# igate ~ N(mean, std), fgate ~ N(mean, std): realistic (fgate bias init 3..6), tiny input gates (stabiliser far
# below 0: where the max state's start matters), huge input gates (exp(i) ~ e^12: stabiliser far above 0; the
# function is ill-conditioned there, normaliser sums cancel, so every form is further from every other), and wide
# gates (forget gates from closed to open).
REGIMES = {"moderate": (0.0, 1.0, 3.0, 2.0), "negative": (-12.0, 3.0, 3.0, 2.0), "positive": (12.0, 3.0, 3.0, 2.0),
           "wide": (0.0, 8.0, 0.0, 6.0)}
# fp64, regime -> (vs mlstm_chunkwise, vs mlstm_parallel); forward and gradients alike. Measured maxima:
# moderate 3.5e-15 / 5.8e-14, negative 1.3e-15 / 6.0e-15, wide 4.2e-14 / 8.9e-13, positive 1.2e-10 / 2.6e-9
# (there our own chunkwise is 2.7e-9 from the parallel form too).
TOL_FP64 = {"moderate": (5e-14, 1e-12), "negative": (2e-14, 1e-13), "wide": (5e-13, 1e-11), "positive": (2e-9, 3e-8)}
# fp32, regime -> ((forward, gradients) vs fp32 mlstm_chunkwise, (forward, gradients) vs the fp64 parallel form).
# Measured: moderate (8.1e-7, 3.5e-6), (1.7e-6, 4.9e-6); negative (5.7e-8, 5.8e-7), (2.6e-7, 6.0e-7); our fp32
# chunkwise is as far from fp64 (1.8e-6, 4.9e-6 and 2.6e-7, 6.0e-7). The fp32 parallel form is not the yardstick
# here: its global cumsums lose more (up to 5.7e-6 / 3.5e-5 from fp64). Huge / wide gates are left to fp64: in fp32
# their ill-conditioning makes every form scatter (up to 1e-3 .. 0.35 between our own two forms).
TOL_FP32 = {"moderate": ((1e-5, 4e-5), (2e-5, 5e-5)), "negative": ((6e-7, 6e-6), (3e-6, 6e-6))}


def _needs_package() -> None:
    pytest.importorskip("mlstm_kernels", reason=SKIP_REASON)


def _inputs(shape: tuple[int, int, int, int], regime: str, dtype: torch.dtype, seed: int = 0):
    """q, k, v, igate, fgate (requiring grad) and an output weight, drawn in fp64 so that dtypes share values."""
    batch, heads, seqlen, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, seqlen, head_dim, generator=gen, dtype=torch.float64) for _ in range(3))
    i_mean, i_std, f_mean, f_std = REGIMES[regime]
    igate = torch.randn(batch, heads, seqlen, generator=gen, dtype=torch.float64) * i_std + i_mean
    fgate = torch.randn(batch, heads, seqlen, generator=gen, dtype=torch.float64) * f_std + f_mean
    weight = torch.randn(batch, heads, seqlen, head_dim, generator=gen, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (q, k, v, igate, fgate)], weight.to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()).abs().max() / b.double().abs().max()).detach())


def _forward_backward(fn, inputs, weight, **kwargs):
    out = fn(*inputs, **kwargs)
    return out.detach(), torch.autograd.grad((out * weight).sum(), inputs)


def _assert_close(out, grads, ref_out, ref_grads, fwd_tol: float, grad_tol: float, what: str) -> None:
    assert _rel(out, ref_out) <= fwd_tol, (what, _rel(out, ref_out))
    for name, grad, ref in zip(("q", "k", "v", "igate", "fgate"), grads, ref_grads):
        assert torch.isfinite(grad).all(), (what, name)
        assert _rel(grad, ref) <= grad_tol, (what, name, _rel(grad, ref))


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("chunk_size", (64, 16))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"S{s[2]}-DH{s[3]}-NH{s[1]}")
@pytest.mark.parametrize("regime", sorted(TOL_FP64))
def test_fp64_forward_and_gradients_match_parallel_and_chunkwise(regime, shape, chunk_size):
    _needs_package()
    torch.set_num_threads(1)
    inputs, weight = _inputs(shape, regime, torch.float64)
    out, grads = _forward_backward(mlstm_kernels_form, inputs, weight, chunk_size=chunk_size)
    assert out.shape == shape and out.dtype == torch.float64
    tol_chunkwise, tol_parallel = TOL_FP64[regime]
    _assert_close(out, grads, *_forward_backward(mlstm_chunkwise, inputs, weight, chunk_size=chunk_size),
                  tol_chunkwise, tol_chunkwise, "chunkwise")
    _assert_close(out, grads, *_forward_backward(mlstm_parallel, inputs, weight), tol_parallel, tol_parallel,
                  "parallel")


@pytest.mark.parametrize("chunk_size", (64, 16))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"S{s[2]}-DH{s[3]}-NH{s[1]}")
@pytest.mark.parametrize("regime", sorted(TOL_FP32))
def test_fp32_forward_and_gradients_within_round_off(regime, shape, chunk_size):
    _needs_package()
    torch.set_num_threads(1)
    inputs, weight = _inputs(shape, regime, torch.float32)
    out, grads = _forward_backward(mlstm_kernels_form, inputs, weight, chunk_size=chunk_size)
    assert out.dtype == torch.float32
    (fwd_c, grad_c), (fwd_exact, grad_exact) = TOL_FP32[regime]
    _assert_close(out, grads, *_forward_backward(mlstm_chunkwise, inputs, weight, chunk_size=chunk_size),
                  fwd_c, grad_c, "fp32 chunkwise")
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    _assert_close(out, grads, *_forward_backward(mlstm_parallel, inputs64, weight.double()), fwd_exact, grad_exact,
                  "fp64 parallel")


def test_low_precision_inputs_run_in_fp32_on_cpu():
    """bf16 inputs are upcast for the native kernel (no low-precision speed-up on CPU) and come back in bf16."""
    _needs_package()
    inputs, _ = _inputs((1, 2, 70, 16), "moderate", torch.bfloat16)
    out = mlstm_kernels_form(*[t.detach() for t in inputs])
    expected = mlstm_kernels_form(*[t.detach().float() for t in inputs])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.bfloat16(), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------- kernel plans
def test_plans_pick_the_kernel_layout_and_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    native = plan_kernel(196, 48, 48, 64, cpu, torch.bfloat16)
    # Native: our chunk layout (4 x 49, no padding), exact -inf start, at least fp32.
    assert (native.kernel, native.seq_len, native.chunk_size, native.exact_start, native.dtype) == (
        NATIVE_KERNEL, 196, 49, True, torch.float32)
    assert plan_kernel(196, 48, 48, 64, cuda, torch.float64).kernel == NATIVE_KERNEL  # Triton has no fp64
    # Triton xl_chunk: up to 64 tokens one power-of-two chunk (>= 16); beyond, a multiple of a power-of-two chunk
    # >= 64; head dims >= 16.
    expected = {10: (16, 16), 50: (64, 64), 64: (64, 64), 65: (128, 64), 196: (256, 64), 257: (320, 64),
                3136: (3136, 64)}
    for seqlen, (padded, chunk) in expected.items():
        plan = plan_kernel(seqlen, 48, 48, 64, cuda, torch.bfloat16)
        assert (plan.kernel, plan.seq_len, plan.chunk_size, plan.exact_start) == (TRITON_KERNEL, padded, chunk, False)
    assert plan_kernel(300, 48, 48, 200, cuda, torch.float32).chunk_size == 128  # power of two <= 200
    assert plan_kernel(300, 48, 48, 16, cuda, torch.float32).chunk_size == 64  # smaller chunks: one warning a call
    small = plan_kernel(300, 8, 4, 64, cuda, torch.float16)
    assert (small.qk_dim, small.v_dim, small.dtype) == (16, 16, torch.float16)
    with pytest.raises(ValueError, match="positive"):
        plan_kernel(0, 8, 8, 64, cpu, torch.float32)


@pytest.mark.parametrize("regime", ("negative", "moderate", "wide"))
def test_triton_layout_and_start_state_stay_within_eps(regime):
    """The CUDA plan (sequence padded to 64 / 256 / 320, head dim 8 zero-padded to 16 with k rescaled, the
    kernel's default max-state start 0 instead of -inf), run through the native kernel on CPU: every output is
    within eps * |h| of the spec, the bound the module docstring derives (the Triton kernel's -10 floor on the
    intra-chunk max is a deviation of the same kind). The -inf start is what makes the CPU path exact."""
    _needs_package()
    torch.set_num_threads(1)
    for shape in ((2, 3, 50, 8), (2, 3, 196, 32), (2, 3, 257, 16)):
        inputs = [t.detach() for t in _inputs(shape, regime, torch.float64)[0]]
        reference = mlstm_parallel(*inputs)
        cuda_plan = plan_kernel(shape[2], shape[3], shape[3], 64, torch.device("cuda"), torch.float32)
        assert cuda_plan.qk_dim == max(16, shape[3]) and not cuda_plan.exact_start
        out = run_plan(dataclasses.replace(cuda_plan, kernel=NATIVE_KERNEL, dtype=torch.float64), *inputs, eps=EPS)
        # Measured: at most 0.996 eps * |h| elementwise; 1e-12 of slack for fp64 round-off.
        bound = EPS * reference.abs() + 1e-12 * reference.abs().max()
        assert ((out - reference).abs() <= bound).all(), shape
        if regime == "negative":  # max state far below 0: the start value is visible, the exact start is not
            assert _rel(out, reference) > 1e-9
            assert _rel(mlstm_kernels_form(*inputs), reference) < 1e-13


# --------------------------------------------------------------------------------------------- whole model
def test_vil_with_mlstm_kernels_equals_chunkwise():
    """A tiny ViL2 (64 tokens; chunk 24 -> 3 chunks of 22 with end padding): same output and parameter gradients
    with the same weights under both backends (fp32). Measured: output 2.5e-7, gradients 2.9e-6 (relative to
    max; our chunkwise vs parallel on the same model: 3.8e-7, 8.7e-6); tolerance 10x."""
    _needs_package()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model("vil2_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8, dim=64, depth=2,
                              num_classes=5, mlstm_backend="mlstm_kernels", mlstm_chunk_size=24)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the zero / constant official init, so that gates and norms matter
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    image = torch.randn(2, 3, 64, 64, generator=generator)
    assert {cell.backend for cell in _cells(model)} == {"mlstm_kernels"}

    def run(backend: str):
        model.set_mlstm_backend(backend)
        model.zero_grad()
        out = model(image)
        (out * torch.arange(1, 6)).sum().backward()
        return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    out_k, grads_k = run("mlstm_kernels")
    out_c, grads_c = run("chunkwise")
    assert _rel(out_k, out_c) <= 3e-6
    for name, grad in grads_c.items():
        assert grad.abs().max() > 0, name
        assert _rel(grads_k[name], grad) <= 3e-5, name


def _cells(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "MLSTMCell"]


# ------------------------------------------------------------------------------------ dispatch and errors
def test_resolve_backend():
    assert "mlstm_kernels" in MLSTM_BACKENDS
    cpu = torch.device("cpu")
    assert resolve_backend("auto", AUTO_PARALLEL_MAX_TOKENS, cpu) == "parallel"
    assert resolve_backend("auto", AUTO_PARALLEL_MAX_TOKENS + 1, cpu) == "chunkwise"
    assert resolve_backend("auto", 3136, "cpu") == "chunkwise"
    assert resolve_backend("auto", 196, "cuda") == "parallel"
    # Long sequences on CUDA: the package's Triton kernel when it imports, else ours (no GPU needed to ask).
    expected_cuda = "mlstm_kernels" if kernels_form.kernels_available("cuda") else "chunkwise"
    assert resolve_backend("auto", 3136, "cuda") == expected_cuda
    for name in ("parallel", "chunkwise", "mlstm_kernels"):
        assert resolve_backend(name, 3136, cpu) == name
        assert resolve_backend(name, 16, "cuda") == name
    with pytest.raises(ValueError, match="mlstm_backend must be one of"):
        resolve_backend("triton", 16, cpu)


def test_mlstm_dispatches_to_the_kernels_form():
    _needs_package()
    inputs = [t.detach() for t in _inputs((1, 2, 40, 8), "moderate", torch.float64)[0]]
    torch.testing.assert_close(mlstm(*inputs, backend="mlstm_kernels", chunk_size=16),
                               mlstm_kernels_form(*inputs, chunk_size=16), atol=0, rtol=0)


def test_missing_package_is_one_clear_import_error(monkeypatch):
    """Without the package: the backend raises ImportError naming the extra and the licence; auto never picks it."""
    monkeypatch.setitem(sys.modules, "mlstm_kernels", None)  # import fails, find_spec says "not installed"
    monkeypatch.setitem(sys.modules, "mlstm_kernels.torch", None)
    kernels_form.load_kernel.cache_clear()
    kernels_form.kernels_available.cache_clear()
    try:
        inputs = [t.detach() for t in _inputs((1, 2, 20, 8), "moderate", torch.float32)[0]]
        with pytest.raises(ImportError) as info:
            mlstm(*inputs, backend="mlstm_kernels")
        assert str(info.value) == ("mlstm_backend='mlstm_kernels' needs the optional package mlstm-kernels (NXAI "
                                   "Community Licence): pip install 'ssl_vil[kernels]'")
        assert not kernels_form.kernels_available("cuda")
        assert resolve_backend("auto", 3136, "cuda") == "chunkwise"
    finally:
        kernels_form.load_kernel.cache_clear()
        kernels_form.kernels_available.cache_clear()


# --------------------------------------------------------------------------------------- config and record
def test_config_accepts_the_backend_and_the_environment_records_the_resolution():
    base = ["data.train=unused", "data.augment.global_size=224", "data.augment.local_size=32"]
    cfg = load_config(RECIPE, [*base, "model.mlstm_backend=auto"])
    # patch 4, middle [CLS]: global 56 x 56 + 1 = 3137 tokens, local 8 x 8 + 1 = 65.
    expected_cuda = "mlstm_kernels" if kernels_form.kernels_available("cuda") else "chunkwise"
    assert mlstm_backend_record(cfg, torch.device("cpu")) == {
        "mlstm_backend": "auto", "mlstm_backend_resolved": {"global": "chunkwise", "local": "parallel"}}
    assert mlstm_backend_record(cfg, torch.device("cuda"))["mlstm_backend_resolved"] == {
        "global": expected_cuda, "local": "parallel"}
    cfg = load_config(RECIPE, [*base, "model.mlstm_backend=mlstm_kernels", "data.augment.n_local=0"])
    assert cfg.model.mlstm_backend == "mlstm_kernels"
    assert mlstm_backend_record(cfg, "cpu") == {"mlstm_backend": "mlstm_kernels",
                                                "mlstm_backend_resolved": {"global": "mlstm_kernels"}}
