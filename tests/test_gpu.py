"""Checks that need CUDA, run by ``bench/gpu_check.py`` (``pytest -m gpu tests/test_gpu.py``); skipped without it.

(a) bf16 autocast: a tiny ViL2 DINOv2 student steps on CUDA in bf16 with a finite loss, the heads' logits in bf16
    (autocast reached them) and the centering softmax, the DINO / iBOT log-softmax and KoLeo in fp32.
(b) ``torch.compile`` of a tiny ViL2 backbone on CUDA matches eager (forward and gradients), per mLSTM backend.
(c) The ``mlstm_kernels`` Triton kernels match our chunkwise form in fp32 (forward and gradients).
(d) A faiss-gpu k-NN search returns the neighbours of the torch search on CPU (when a GPU faiss build imports).

The CPU suite covers the same code paths on CPU (test_train_bf16.py, test_compile_backbone.py,
test_backbone_mlstm_kernels.py, test_eval_knn.py); these tests add what only a GPU runs: CUDA autocast, Inductor's
Triton code, the Triton mLSTM kernels and faiss's GPU index.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F

import ssl_vil.backbones  # noqa: F401  (registers the timm models)
from ssl_vil.backbones import mlstm_chunkwise
from ssl_vil.backbones.kernels_form import TRITON_KERNEL, kernels_available, mlstm_kernels_form, plan_kernel
from ssl_vil.config import load_config
from ssl_vil.eval.knn_search import search_faiss, search_torch
from ssl_vil.infra.precision import autocast
from ssl_vil.objectives import self_distillation
from ssl_vil.train.build import build_optimizer, build_ssl_objective

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run by bench/gpu_check.py)"),
]

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "vil2_s16_dinov2_in1k.yaml"
# The DINOv2 recipe (DINO + iBOT + KoLeo) shrunk: ViL2 dim 64, 2 block pairs, patch 4 on 32 px globals (8 x 8 grid),
# 2 local crops of 16 px, K = 256; step-based schedule because no dataset is read.
TINY = ["model.dim=64", "model.depth=2", "model.patch_size=4", "data.augment.global_size=32",
        "data.augment.local_size=16", "data.augment.n_local=2", "data.samples_per_epoch=null",
        "objective.dino_head.out_dim=256", "objective.dino_head.hidden_dim=128",
        "objective.dino_head.bottleneck_dim=32", "objective.ibot_head.out_dim=256",
        "objective.ibot_head.hidden_dim=128", "objective.ibot_head.bottleneck_dim=32",
        "schedule.total_steps=10", "schedule.warmup_steps=2", "schedule.teacher_temp_warmup_steps=2",
        "schedule.freeze_last_layer_steps=1", "optim.global_batch_size=4", "train.device=cuda"]
CUDA = torch.device("cuda")


def _load_gpu_check() -> Any:
    spec = importlib.util.spec_from_file_location("bench_gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


GPU_CHECK = _load_gpu_check()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: one number per tensor, insensitive to the tensor's scale."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


# --- (a) bf16 autocast ---------------------------------------------------------------------------------------------


def _tiny_batch(cfg: Any, batch: int) -> dict[str, Any]:
    """The benchmark's random multi-crop batch (the project's collate, iBOT masks included), on CUDA."""
    return GPU_CHECK.to_device(GPU_CHECK.random_multicrop_batch(cfg, batch), CUDA)


def test_bf16_autocast_step_keeps_losses_in_fp32(monkeypatch):
    cfg = load_config(RECIPE, TINY, world_size=1)
    torch.manual_seed(0)
    objective = build_ssl_objective(cfg).to(CUDA)
    optimizer = build_optimizer(cfg, objective.student)
    data = _tiny_batch(cfg, 4)
    k = cfg.objective.dino_head.out_dim

    # Record what the losses receive and return: the objective calls them through its module namespace.
    calls: dict[str, list[tuple[list[torch.dtype], torch.dtype]]] = {}

    def recording(name: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
            out = fn(*args, **kwargs)
            tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
            dtypes = [t.dtype for t in tensors if t.is_floating_point()]
            calls.setdefault(name, []).append((dtypes, out.dtype))
            return out
        return wrapped

    for name in ("centered_teacher_probs", "dino_cross_entropy", "ibot_patch_loss", "koleo_loss"):
        monkeypatch.setattr(self_distillation, name, recording(name, getattr(self_distillation, name)))
    # The softmaxes over the K prototypes themselves (not only their results): every log-softmax of a K-wide input.
    log_softmax_dtypes: list[torch.dtype] = []
    real_log_softmax = F.log_softmax

    def log_softmax(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x.shape[-1] == k:
            log_softmax_dtypes.append(x.dtype)
        return real_log_softmax(x, *args, **kwargs)

    monkeypatch.setattr(F, "log_softmax", log_softmax)

    for _ in range(2):  # two steps: the second runs on centers and weights the first one moved
        with autocast("bf16", CUDA):
            out = objective(data, teacher_temp=0.04)
        values = {n: float(v.detach()) for n, v in out.items()}
        assert all(math.isfinite(v) for v in values.values()), values
        assert out["loss"].dtype == torch.float32
        out["loss"].backward()
        grads = [p.grad for p in objective.student.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.update_teacher(0.996)
        objective.commit_step()

    # Teacher targets: softmax((logits - center) / T) in fp32, from logits the bf16 teacher head produced.
    assert calls["centered_teacher_probs"] and all(out == torch.float32 and torch.bfloat16 in ins
                                                   for ins, out in calls["centered_teacher_probs"])
    # Student side: fp32 losses; the DINO / iBOT ones from bf16 head logits (autocast is on). KoLeo's features come
    # out of the backbone's final LayerNorm, which autocast runs in fp32 anyway, so only its result is checked.
    for name in ("dino_cross_entropy", "ibot_patch_loss", "koleo_loss"):
        assert calls[name], f"{name} was not called"
        for ins, out in calls[name]:
            assert out == torch.float32, (name, out)
            assert name == "koleo_loss" or torch.bfloat16 in ins, (name, ins)
    assert log_softmax_dtypes and set(log_softmax_dtypes) == {torch.float32}, log_softmax_dtypes
    for center in (objective.dino_center, objective.ibot_center):
        assert center is not None and center.center.dtype == torch.float32
        assert torch.isfinite(center.center).all()


# --- (b) torch.compile ---------------------------------------------------------------------------------------------

# fp32 with TF32 off in both runs: eager and Inductor then differ by summation order only (~1e-6 relative on this
# depth-2 model); 1e-4 leaves ~100x margin and still catches a wrong fusion or a dropped op (O(1e-2) and more).
COMPILE_TOL = 1e-4


@pytest.mark.parametrize("backend", ["parallel", "chunkwise"])
def test_compiled_backbone_matches_eager(backend, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model("vil2_tiny_patch16_224", patch_size=4, dim=64, depth=2, img_size=32, num_classes=0,
                              mlstm_backend=backend).to(CUDA).train()
    x = torch.randn(4, 3, 32, 32, device=CUDA)
    weight = torch.randn_like(model.forward_features(x))

    def forward_backward(fn: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = fn(x)
        (out * weight).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_out, eager_grads = forward_backward(model.forward_features)
    compiled_out, compiled_grads = forward_backward(torch.compile(model.forward_features))
    torch._dynamo.reset()
    assert _rel(compiled_out, eager_out) <= COMPILE_TOL
    assert compiled_grads.keys() == eager_grads.keys()
    worst = {n: _rel(compiled_grads[n], g) for n, g in eager_grads.items()}
    assert max(worst.values()) <= COMPILE_TOL, sorted(worst.items(), key=lambda kv: -kv[1])[:5]


# --- (c) mlstm_kernels Triton parity -------------------------------------------------------------------------------

# Triton's tl.dot on fp32 operands computes in TF32 (operands rounded to 10 mantissa bits, unit roundoff
# 2^-11 ~ 4.9e-4, fp32 accumulation); the reference is our chunkwise form in true fp32 (TF32 off). A dot product of
# DH = 48 such terms is off by a few unit roundoffs of its scale, so the output is ~1e-3 (relative to its maximum)
# from the reference; the backward chains about twice as many TF32 products. The kernel's max-state start (0, not
# -inf) adds at most eps * |h| (kernels_form docstring), far below this. A real fault (key scaling, gate
# convention, chunk layout, end padding) is off by 1e-1 .. 1.
TRITON_FWD_TOL = 2e-3
TRITON_GRAD_TOL = 5e-3


def _needs_triton_kernels() -> None:
    pytest.importorskip("mlstm_kernels", reason="mlstm-kernels (optional extra ssl_vil[kernels]) is not installed")
    pytest.importorskip("triton", reason="triton is not importable")
    if not kernels_available("cuda"):
        pytest.skip("mlstm-kernels imports but its Triton kernels are not registered")


@pytest.mark.parametrize("seqlen", [196, 1024])  # 196: padded to 4 chunks of 64; 1024: 16 full chunks
def test_triton_kernels_match_chunkwise(seqlen, monkeypatch):
    _needs_triton_kernels()
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # the reference in true fp32
    batch, heads, head_dim = 2, 4, 48
    assert plan_kernel(seqlen, head_dim, head_dim, 64, CUDA, torch.float32).kernel == TRITON_KERNEL
    gen = torch.Generator().manual_seed(0)
    q, k, v, weight = (torch.randn(batch, heads, seqlen, head_dim, generator=gen) for _ in range(4))
    # Realistic gates: input gates ~ N(0, 1), forget-gate pre-activations ~ N(3, 2) (bias init 3..6).
    igate = torch.randn(batch, heads, seqlen, generator=gen)
    fgate = torch.randn(batch, heads, seqlen, generator=gen) * 2.0 + 3.0
    inputs = [t.to(CUDA) for t in (q, k, v, igate, fgate)]
    weight = weight.to(CUDA)

    def forward_backward(fn: Any) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = fn(*leaves, eps=1e-6, chunk_size=64)
        return out.detach(), torch.autograd.grad((out.float() * weight).sum(), leaves)

    ref_out, ref_grads = forward_backward(mlstm_chunkwise)
    out, grads = forward_backward(mlstm_kernels_form)
    assert out.dtype == torch.float32 and out.shape == ref_out.shape
    assert _rel(out, ref_out) <= TRITON_FWD_TOL
    names = ("q", "k", "v", "igate", "fgate")
    worst = {n: _rel(g, r) for n, g, r in zip(names, grads, ref_grads, strict=True)}
    assert max(worst.values()) <= TRITON_GRAD_TOL, worst


# --- (d) faiss-gpu -------------------------------------------------------------------------------------------------

# faiss's GPU GEMM may run in TF32: a unit-vector inner product over 64 dims is then off by up to ~1e-3.
FAISS_SIM_TOL = 2e-3


def test_faiss_gpu_knn_matches_torch_cpu():
    faiss = pytest.importorskip("faiss", reason="faiss is not installed")
    if not hasattr(faiss, "StandardGpuResources"):
        pytest.skip("the installed faiss is a CPU build (faiss-gpu needed)")
    gen = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(5000, 64, generator=gen), dim=1)
    queries = F.normalize(torch.randn(200, 64, generator=gen), dim=1)
    k = 10
    t_sims, t_idx = search_torch(queries, bank, k)
    f_sims, f_idx = search_faiss(queries.to(CUDA), bank.to(CUDA), k, use_gpu=True)
    assert f_idx.device.type == CUDA.type  # results come back on the queries' device
    f_sims, f_idx = f_sims.cpu(), f_idx.cpu()
    assert torch.allclose(f_sims, t_sims, rtol=0, atol=FAISS_SIM_TOL)
    # Same neighbour sets, except where a neighbour's similarity ties the k-th one within the tolerance (then either
    # is a correct answer).
    for row in range(queries.shape[0]):
        only = set(t_idx[row].tolist()) ^ set(f_idx[row].tolist())
        kth = float(t_sims[row, -1])
        assert all(abs(float(queries[row] @ bank[i]) - kth) <= FAISS_SIM_TOL for i in only), (row, sorted(only))
