"""mLSTM through NX-AI's optional ``mlstm-kernels`` package (Triton on CUDA, its native torch kernel elsewhere).

``mlstm_kernels_form`` computes the function of :func:`~ssl_vil.backbones.parallel_form.mlstm_parallel` (the
spec: keys scaled by DH^-0.5, exponential input gate, logsigmoid forget gate, max stabiliser, normaliser
``max(|n|, exp(-m)) + eps``) with the package's chunkwise kernels. The package is under the NXAI Community Licence
(not Apache-2.0), so it is an optional extra (``pip install 'ssl_vil[kernels]'``) and is imported only when this
backend runs (or when ``auto`` asks whether it could, on CUDA).

Facts about ``mlstm-kernels==2.0.6`` (``mlstm_kernels/torch``) this module relies on:

* API: ``mlstm_kernels.torch.get_mlstm_kernel(name)`` returns ``fn(q, k, v, i, f, c_initial=None,
  n_initial=None, m_initial=None, return_last_states=False, eps=1e-6, chunk_size=..., autocast_kernel_dtype=...)``
  with q, k (B, NH, S, DHQK), v (B, NH, S, DHHV), i, f (B, NH, S). It returns h (B, NH, S, DHHV), or with
  ``return_last_states=True`` ``(h, (c (B, NH, DHQK, DHHV), n (B, NH, DHQK), m (B, NH, 1)))``. The module class
  ``backend_module.mLSTMBackend`` wraps the same functions (train / train_with_padding / inference modes, last
  states returned by default); we call the kernel function directly and never ask for states.
* Gates: ``i`` and ``f`` are *pre-activations*, as ours: input gate exp(i), forget gate sigmoid(f) used in log
  space (``logsigmoid`` + cumsum, in fp32 on the Triton path). No conversion needed.
* Scaling: the kernels multiply q k^T by DHQK^-0.5 themselves (``qk_scale=None`` -> ``DHQK**-0.5``; the registry
  functions do not let it be set), so k is passed unscaled (scaled only to undo head-dim padding, see below).
* Normaliser: ``max(|n_t|, exp(-m_t)) + eps``, eps passed through (default 1e-6): the same form as ours.
* Stabiliser: the max state m_t is ``max(intra-chunk row max, b_t + m_inter)`` where m_inter is a recurrent
  max state that starts at ``m_initial``, default **0** (ours starts at -inf, so our m_t is the parallel row
  maximum). The start value only enters through eps: with N, D the unstabilised numerator and denominator,
  ``h = N / (max(|D|, 1) + eps * exp(m_t))``; a start of 0 makes ``m_t = max(m_row, sum_{u<=t} log f_u)``, so
  ``exp(m_t) <= max(exp(m_row), 1)`` and ``|h_kernel - h_ours| <= eps * |h|``. The Triton kernel also floors the
  intra-chunk max at -10 (``MINIMUM_MAX_VAL``, fixed), a deviation of the same kind and bound.
* Chunk constraints: native: ``S % chunk_size == 0`` (asserted), any chunk length. Triton ``xl_chunk``: S
  divisible by 16; S < 128 must be a power of two (one chunk of S); otherwise S divisible by the chunk size, a
  power of two, a multiple of 64 (smaller chunks log a warning on every call). Head dims: any (block pointers
  with bounds checks; the one unmasked load, of the n state in the forward, reads neighbouring finite state
  entries that meet zero-padded q), but its ``tl.dot`` blocks need >= 16.
* Devices / dtypes: ``chunkwise--native_autograd`` / ``native_custbw`` are plain torch (any device, any float
  dtype, fp64 included). The ``triton_*`` kernels are CUDA only, registered only if ``triton`` imports, and take
  fp32 / bf16 / fp16 (Triton's default precision for an fp32 ``tl.dot`` is TF32). h comes back in q's dtype.
* ``native_custbw`` (hand-written backward) is not used: on CPU its q, k, i, f gradients differ from autograd
  through the same forward by O(1) relative (fp32 and fp64), while ``native_autograd``'s match ours.

What this module does with them:

* CPU (and CUDA in fp64): ``chunkwise--native_autograd`` with ``m_initial = -inf``, which makes its stabiliser
  the parallel row maximum: the same function as ours up to round-off (fp64: ~1e-15), gradients by autograd.
  The chunk layout is ours (:func:`~ssl_vil.backbones.chunkwise_form.chunk_layout`: 196 tokens -> 4 x 49).
* CUDA (fp32 / bf16 / fp16): ``chunkwise--triton_xl_chunk`` with its default start state (the configuration its
  authors test; -inf through its hand-written backward is unverified), so h differs from ours by at most
  ``eps * |h|`` as derived above (below bf16 / TF32 round-off, a few fp32 ulps). The chunk length is the largest power of two
  <= ``chunk_size``, at least 64; head dims below 16 are zero-padded (k rescaled so q k^T keeps DH^-0.5).
* Lengths the kernel cannot take are padded at the END and sliced off (causal: padded tokens never reach a real
  output), as in :mod:`~ssl_vil.backbones.chunkwise_form`.
* Dtypes: the native path computes in the promoted dtype of the inputs, at least fp32 (bf16 / fp16 inputs are
  upcast: no low-precision speed-up on CPU) and returns q's dtype. The Triton path computes in the CUDA autocast
  dtype when autocast is on, else in the inputs' promoted dtype; all five inputs are cast to it (gates included, as the package's
  own layers call it; the kernel upcasts the gates to fp32 inside) and h is returned in it.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ssl_vil.backbones.chunkwise_form import chunk_layout

NATIVE_KERNEL = "chunkwise--native_autograd"
TRITON_KERNEL = "chunkwise--triton_xl_chunk"
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MISSING_PACKAGE = ("mlstm_backend='mlstm_kernels' needs the optional package mlstm-kernels (NXAI Community Licence): "
                   "pip install 'ssl_vil[kernels]'")
# Triton xl_chunk limits (mlstm_kernels/triton/chunkwise/kernel_param_heuristics.py and its tl.dot blocks).
_TRITON_MIN_CHUNK = 64  # smaller chunk sizes work but log a warning on every call
_TRITON_SINGLE_CHUNK_BELOW = 128  # shorter sequences are one chunk whose length must be a power of two
_TRITON_MIN_LEN = 16
_TRITON_MIN_HEAD_DIM = 16


@functools.cache
def load_kernel(name: str) -> Callable[..., torch.Tensor]:
    """The package's kernel function ``name`` (e.g. ``"chunkwise--native_autograd"``); ImportError if unusable."""
    try:
        from mlstm_kernels.torch import get_mlstm_kernel
    except ImportError as exc:
        if importlib.util.find_spec("mlstm_kernels") is None:
            raise ImportError(MISSING_PACKAGE) from None
        raise ImportError(f"mlstm_backend='mlstm_kernels': the installed mlstm-kernels does not import ({exc}); "
                          f"reinstall it: pip install 'ssl_vil[kernels]'") from exc
    try:
        return get_mlstm_kernel(name)
    except ValueError:
        # The package registers its Triton kernels only when triton imports.
        raise ImportError(f"mlstm_backend='mlstm_kernels' on CUDA needs triton for the {name} kernel, and it "
                          f"does not import here; install the torch build that ships it, or use "
                          f"mlstm_backend='chunkwise'") from None


@functools.cache
def kernels_available(device_type: str) -> bool:
    """Whether ``mlstm_kernels_form`` can run on a device of this type (package installed; Triton on CUDA).
    Cached: asked on every ``auto`` forward with a long sequence."""
    if importlib.util.find_spec("mlstm_kernels") is None:
        return False
    try:
        load_kernel(TRITON_KERNEL if device_type == "cuda" else NATIVE_KERNEL)
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class KernelPlan:
    """How one call is laid out for a kernel: which kernel, the (padded) sequence length and chunk length it is
    given, the (padded) head dims, whether the max state starts at -inf (exact stabiliser) and the dtype."""

    kernel: str
    seq_len: int
    chunk_size: int
    qk_dim: int
    v_dim: int
    exact_start: bool
    dtype: torch.dtype


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def plan_kernel(seqlen: int, head_dim: int, value_dim: int, chunk_size: int, device: torch.device,
                dtype: torch.dtype) -> KernelPlan:
    """The kernel and layout for (B, NH, seqlen, head_dim) queries, (.., value_dim) values on ``device``, with
    inputs of (promoted) ``dtype`` (autocast dtype already applied by the caller)."""
    if seqlen < 1 or chunk_size < 1:
        raise ValueError(f"seqlen and chunk_size must be positive, got seqlen={seqlen}, chunk_size={chunk_size}")
    if device.type == "cuda" and dtype in TRITON_DTYPES:
        if _next_pow2(seqlen) < _TRITON_SINGLE_CHUNK_BELOW:  # up to 64 tokens: one power-of-two chunk
            padded = chunk = max(_TRITON_MIN_LEN, _next_pow2(seqlen))
        else:  # largest power of two <= chunk_size, at least 64; then padded >= 128
            chunk = max(_TRITON_MIN_CHUNK, 1 << (chunk_size.bit_length() - 1))
            padded = math.ceil(seqlen / chunk) * chunk
        return KernelPlan(TRITON_KERNEL, padded, chunk, max(head_dim, _TRITON_MIN_HEAD_DIM),
                          max(value_dim, _TRITON_MIN_HEAD_DIM), exact_start=False, dtype=dtype)
    num_chunks, chunk = chunk_layout(seqlen, chunk_size)
    native_dtype = torch.promote_types(dtype, torch.float32)  # bf16/fp16 -> fp32, fp64 stays
    return KernelPlan(NATIVE_KERNEL, num_chunks * chunk, chunk, head_dim, value_dim, exact_start=True,
                      dtype=native_dtype)


def run_plan(
    plan: KernelPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    igate_preact: torch.Tensor,
    fgate_preact: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Run ``plan``'s kernel: pad (head dims, then the sequence at the end), call, slice. Shapes as in
    ``mlstm_kernels_form``; the result has ``plan.dtype``."""
    batch, num_heads, seqlen, head_dim = q.shape
    value_dim = v.shape[-1]
    q, k, v, igate_preact, fgate_preact = (t.to(plan.dtype) for t in (q, k, v, igate_preact, fgate_preact))
    if plan.qk_dim != head_dim:
        # Zero dims leave q k^T unchanged, but the kernel scales by qk_dim^-0.5: rescale k to keep head_dim^-0.5.
        k = k * math.sqrt(plan.qk_dim / head_dim)
        q, k = (F.pad(t, (0, plan.qk_dim - head_dim)) for t in (q, k))
    if plan.v_dim != value_dim:
        v = F.pad(v, (0, plan.v_dim - value_dim))
    pad = plan.seq_len - seqlen
    if pad:
        # Any finite values work: padded tokens sit after every real token and are discarded.
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        igate_preact, fgate_preact = (F.pad(t, (0, pad)) for t in (igate_preact, fgate_preact))
    m_initial = None
    if plan.exact_start:
        # No past: the max state starts at -inf, so m_t is the parallel row maximum (the spec), not max(.., 0).
        m_initial = torch.full((batch, num_heads, 1), float("-inf"), dtype=plan.dtype, device=q.device)
    kernel = load_kernel(plan.kernel)
    h = kernel(q=q, k=k, v=v, i=igate_preact, f=fgate_preact, m_initial=m_initial, return_last_states=False,
               eps=eps, chunk_size=plan.chunk_size, autocast_kernel_dtype=plan.dtype)
    return h[:, :, :seqlen, :value_dim]


def mlstm_kernels_form(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    igate_preact: torch.Tensor,
    fgate_preact: torch.Tensor,
    eps: float = 1e-6,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Stabilised mLSTM through ``mlstm-kernels`` (same arguments and result as ``mlstm_chunkwise``).

    Args:
        q, k: (B, NH, S, DH) queries / keys (unscaled: the kernel applies DH^-0.5).
        v: (B, NH, S, DHV) values.
        igate_preact, fgate_preact: (B, NH, S) gate pre-activations (exponential input gate, sigmoid forget gate).
        eps: normaliser eps (added after the max).
        chunk_size: maximum chunk length; native: as ``mlstm_chunkwise``; Triton: a power of two >= 64.

    Returns:
        h: (B, NH, S, DHV); q's dtype on the native path, the kernel dtype on the Triton path (module docstring).

    Raises:
        ImportError: mlstm-kernels is not installed (or, on CUDA, triton does not import).
    """
    inputs = (q, k, v, igate_preact, fgate_preact)
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in inputs))
    if q.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    plan = plan_kernel(q.shape[-2], q.shape[-1], v.shape[-1], chunk_size, q.device, dtype)
    # Triton: the inputs are cast to plan.dtype here, so the kernel's own autocast cast (custom_fwd) is a no-op.
    h = run_plan(plan, *inputs, eps=eps)
    return h if plan.kernel == TRITON_KERNEL else h.to(q.dtype)
