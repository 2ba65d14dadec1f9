"""Vision-LSTM backbones: ``VisionLSTM2`` (v2, the paper's main models) and ``VisionLSTM`` (v1).

Both keep the official state_dict key names (an official hub state_dict loads with ``strict=True``) and follow
the timm model contract (``forward_features`` / ``forward_head`` / ``forward_intermediates`` / ``group_matcher``
/ ``no_weight_decay`` / ``reset_classifier`` / ``set_grad_checkpointing``).

Differences from the official hub classes (all behaviour-preserving for the released checkpoints):
  * the v2 conv and the position embedding use the *runtime* token grid, so any resolution, non-square
    inputs and ``stride`` work for both classes (the official v2 reshapes with the constructor's grid);
  * ``mlstm_backend`` selects the quadratic (official) or the linear-time chunkwise mLSTM, or the optional
    mlstm-kernels one (Triton on CUDA), same function;
  * an optional learned ``mask_token`` (iBOT-style masked inputs), created only when asked for;
  * an optional learned middle [CLS] token (``cls_token="middle"``: inserted at index S // 2 of the S patch
    tokens, pooling ``middle_cls``; the Vision-LSTM paper's pooling ablation), created only when asked for;
  * extra poolings ("avg", "first", "last", "middle") and ``drop_rate`` (dropout before the head).

Norm roles (official naming, see the spec's section 3.1):
  * v2: ``norm`` = per-token final norm (residual LN, eps 1e-6); ``legacy_norm`` = LayerNorm on the pooled
    features before the head (eps 1e-5, only if ``legacy_norm=True``).
  * v1 with ``legacy_norm=True``: ``legacy_norm`` = per-token final norm (residual LN, no bias, eps 1e-5);
    ``norm`` = LayerNorm on the pooled features before the head (eps 1e-6).
  * v1 with ``legacy_norm=False``: ``norm`` (LayerNorm, eps 1e-6) is the per-token final norm; no head norm.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ssl_vil.backbones.designs import DEFAULT_BLOCK_DESIGN, check_block_design
from ssl_vil.backbones.drop_path import drop_path_rates
from ssl_vil.backbones.embed import PatchEmbed, PosEmbed2d, to_2tuple
from ssl_vil.backbones.mlstm_cell import check_backend
from ssl_vil.backbones.norms import ResidualLayerNorm
from ssl_vil.backbones.pooling import canonical_pooling, pool_tokens, pooled_dim, token_layout
from ssl_vil.backbones.vil_block import ViLBlock, ViLBlockPair
from ssl_vil.backbones.vil_layer import ViLLayer

INIT_WEIGHTS = ("original", "original-fixed")


class _VisionLSTMBase(nn.Module):
    """Shared stem, masking, forward and timm plumbing of both ViL versions (see the subclasses)."""

    # Names of the per-token final norm and of the optional pre-head norm; set by the subclasses.
    _final_norm_name: str
    _head_norm_name: str | None
    # Number of entries of ``blocks`` that count as one layer for layer-wise lr decay.
    _blocks_per_decay_layer: int

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        stride: int | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        dim: int = 192,
        pooling: str = "bilateral_concat",
        drop_rate: float = 0.0,
        legacy_norm: bool = False,
        mlstm_backend: str = "auto",
        mlstm_chunk_size: int = 64,
        mask_token: bool = False,
        cls_token: str | None = None,
    ) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = int(patch_size)
        self.stride = int(stride) if stride is not None else self.patch_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.dim = self.embed_dim = self.num_features = dim
        self.global_pool = canonical_pooling(pooling)
        self.head_hidden_size = pooled_dim(dim, self.global_pool)
        self.drop_rate = drop_rate
        self.use_legacy_norm = legacy_norm
        self.mlstm_backend = check_backend(mlstm_backend)
        self.mlstm_chunk_size = mlstm_chunk_size
        self.num_prefix_tokens = 0
        self.grad_checkpointing = False
        if mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, dim))
        else:
            self.register_parameter("mask_token", None)
        if cls_token not in (None, "middle"):
            raise ValueError(f"cls_token must be None or 'middle', got {cls_token!r}")
        # A learned token inserted at index S // 2 of the S patch tokens (the Vision-LSTM paper's middle [CLS]).
        self.cls_token_position = cls_token
        if cls_token == "middle":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            with torch.random.fork_rng(devices=[]):  # the other parameters initialise as without the token
                nn.init.trunc_normal_(self.cls_token, std=0.02)
        else:
            self.register_parameter("cls_token", None)
        if self.global_pool == "cls" or (self.global_pool == "middle_cls" and cls_token != "middle"):
            raise ValueError(f"pooling {pooling!r} needs a class token: ViL has none ('cls' is a ViT pooling), "
                             "'middle_cls' needs cls_token='middle'")
        self.patch_embed = PatchEmbed(dim, self.patch_size, in_chans=in_chans, stride=stride)
        # The stored grid is image // patch even with an overlapping stride (official layout); it is resized
        # to the runtime grid in forward.
        self.pos_embed = PosEmbed2d((self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size), dim)
        self.head_drop = nn.Dropout(drop_rate)

    # ----------------------------------------------------------------------------------------------- helpers
    @property
    def final_norm(self) -> nn.Module:
        return getattr(self, self._final_norm_name)

    @property
    def head_norm(self) -> nn.Module | None:
        return getattr(self, self._head_norm_name) if self._head_norm_name else None

    @property
    def num_layers_for_decay(self) -> int:
        """Number of layer-wise lr-decay groups: stem, one per block pair (v1: two blocks), head."""
        return -(-len(self.blocks) // self._blocks_per_decay_layer) + 2

    def layers(self) -> list[ViLLayer]:
        return [m for m in self.modules() if isinstance(m, ViLLayer)]

    def set_mlstm_backend(self, backend: str, chunk_size: int | None = None) -> None:
        """Switch every layer to the "parallel", "chunkwise", "mlstm_kernels" or "auto" mLSTM (same function,
        different cost; "mlstm_kernels" needs the optional package, see ``ssl_vil.backbones.kernels_form``)."""
        self.mlstm_backend = check_backend(backend)
        if chunk_size is not None:
            self.mlstm_chunk_size = chunk_size
        for layer in self.layers():
            layer.set_backend(backend, chunk_size)

    def grid_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid (h, w) for an input of spatial size ``img_size``."""
        return self.patch_embed.grid_size(img_size)

    def _feature_info(self) -> list[dict[str, Any]]:
        # The reduction is the step between neighbouring map positions in pixels: the patch stride, which is
        # smaller than the patch size for overlapping patches.
        return [dict(num_chs=self.dim, reduction=self.stride, module=f"blocks.{i}") for i in range(len(self.blocks))]

    def _make_head(self) -> nn.Module:
        if self.num_classes > 0:
            head = nn.Linear(self.head_hidden_size, self.num_classes)
            nn.init.trunc_normal_(head.weight, std=2e-5)
            nn.init.zeros_(head.bias)
            return head
        return nn.Identity()

    # ------------------------------------------------------------------------------------------------ forward
    def _embed(self, x: torch.Tensor, masks: torch.Tensor | None) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image (B, C, H, W) -> tokens (B, S, d) with position embedding, and the grid (h, w)."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        self.grid_size((x.shape[-2], x.shape[-1]))  # one clear error for an input smaller than a patch
        x = self.patch_embed(x)
        batch, height, width, _ = x.shape
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("masks were given but the model has no mask token; build it with mask_token=True")
            if masks.dtype != torch.bool:
                raise ValueError(f"masks must be a bool tensor, got dtype {masks.dtype}")
            if tuple(masks.shape) not in ((batch, height, width), (batch, height * width)):
                raise ValueError(
                    f"masks must have shape (B, h, w)=({batch}, {height}, {width}) or (B, S)=({batch}, "
                    f"{height * width}), got {tuple(masks.shape)}"
                )
            masks = masks.reshape(batch, height, width, 1)
            x = torch.where(masks, self.mask_token.to(x.dtype), x)
        x = self.pos_embed(x).flatten(1, 2)
        if self.cls_token is not None:
            x = self._insert_middle_token(x)
        return x, (height, width)

    def _insert_middle_token(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, S, d) -> (B, S + 1, d) with the learned token at index S // 2 (after the masking and
        the position embedding, which apply to patches only)."""
        seqlen = x.shape[1]
        if seqlen % 2 and isinstance(self, VisionLSTM2):
            # The v2 grid conv finds the token at the centre of the sequence in both row directions, which is
            # index S // 2 only for an even number of patches.
            raise ValueError(f"cls_token='middle' needs an even number of patches for VisionLSTM2, got {seqlen}")
        index = seqlen // 2
        token = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([x[:, :index], token, x[:, index:]], dim=1)

    def _patch_part(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S [+ 1], d) -> the (B, S, d) patch tokens (the middle token removed, if the model has one)."""
        if self.cls_token is None:
            return x
        index = (x.shape[1] - 1) // 2
        return torch.cat([x[:, :index], x[:, index + 1:]], dim=1)

    def _run_block(self, block: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(block, x, grid, use_reentrant=False)
        return block(x, grid)

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Image (B, C, H, W) -> final-norm tokens (B, S, d), S = h * w row-major (top-left first); with
        ``cls_token="middle"`` (B, S + 1, d), the learned token at index S // 2.

        ``masks``: optional bool (B, h, w) or (B, S) over the patches; True replaces that patch embedding by
        ``mask_token`` (before the position embedding).
        """
        x, grid = self._embed(x, masks)
        for block in self.blocks:
            x = self._run_block(block, x, grid)
        return self.final_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Final-norm tokens (B, S, d) -> logits (B, num_classes), or the (normed) pooled features
        (B, head_hidden_size) if ``pre_logits``."""
        x = pool_tokens(x, self.global_pool, token_layout(self))
        if self.head_norm is not None:
            x = self.head_norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, masks=masks))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        masks: torch.Tensor | None = None,
    ) -> Any:
        """timm-style intermediates: outputs of the entries of ``blocks`` (v2: block pairs, v1: blocks).

        Returns (final-norm tokens (B, S, d), [intermediates]) unless ``intermediates_only`` / ``output_dict``.
        Intermediates are feature maps (B, d, h, w) for ``output_fmt="NCHW"``, (h, w) = ``grid_size((H, W))``
        for any input (B, C, H, W) at least one patch large (any stride, non-square, any grid): the middle token
        of ``cls_token="middle"`` is not a position of the map and is dropped. For "NLC" they are the block
        outputs (B, S, d) as they are, the middle token included (S + 1, at index S // 2), which the poolings
        need. ``norm`` applies the final per-token norm to them. There are no prefix tokens
        (``return_prefix_tokens`` is ignored); attention masks do not apply to ViL.
        """
        from timm.models._features import feature_take_indices

        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        if attn_mask is not None or is_causal:
            raise ValueError("attention masks are not supported by ViL (it has no attention)")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, grid = self._embed(x, masks)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        for index, block in enumerate(blocks):
            x = self._run_block(block, x, grid)
            if index in take_indices:
                intermediates.append(self.final_norm(x) if norm else x)
        if output_fmt == "NCHW":
            intermediates = [
                self._patch_part(y).reshape(y.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
                for y in intermediates
            ]
        if output_dict:
            result: dict[str, Any] = {"image_intermediates": intermediates}
            if not intermediates_only:
                result["image_features"] = self.final_norm(x)
            return result
        if intermediates_only:
            return intermediates
        return self.final_norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        from timm.models._features import feature_take_indices

        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            setattr(self, self._final_norm_name, nn.Identity())
        if prune_head:
            self.reset_classifier(0)
        return take_indices

    # ------------------------------------------------------------------------------------------- timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = {"pos_embed.embed"}
        if self.mask_token is not None:
            names.add("mask_token")
        if self.cls_token is not None:
            names.add("cls_token")
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer groups for layer-wise lr decay: stem, one group per block pair (v1: two blocks), the final
        per-token norm joins the last pair, the head (and pre-head norm) is the last group."""
        del coarse  # one grouping serves both
        block_rules: list[tuple[str, tuple[int, ...] | None]] = []
        if self._blocks_per_decay_layer == 2:
            # (99999,) merges a group into the previous one: every odd block joins its even predecessor.
            block_rules.append((r"^blocks\.(\d*[13579])\.", (99999,)))
        block_rules.append((r"^blocks\.(\d+)\.", None))
        block_rules.append((rf"^{self._final_norm_name}\.", (99999,)))
        return dict(stem=r"^mask_token|^cls_token|^patch_embed|^pos_embed", blocks=block_rules)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New head for ``num_classes`` (0: identity). A new ``global_pool`` also rebuilds the pre-head norm
        if the pooled size changes."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = canonical_pooling(global_pool)
            new_hidden = pooled_dim(self.dim, self.global_pool)
            if new_hidden != self.head_hidden_size and self.head_norm is not None:
                old = self.head_norm
                setattr(self, self._head_norm_name, nn.LayerNorm(new_hidden, eps=old.eps).to(old.weight))
            self.head_hidden_size = new_hidden
        device_dtype = next(self.parameters())
        self.head = self._make_head().to(device_dtype)


class VisionLSTM2(_VisionLSTMBase):
    """Vision-LSTM v2. Input (B, C, H, W); ``depth`` = number of block pairs (official ViL-T/S/B: 12).

    Block pair = top-left -> bottom-right sub-block, then the reversed one (``block_design="alternating"``, the
    official model); depthwise 3x3 conv on the grid; biases in projections and norms. Default pooling: bilateral
    concat (official "bilateral_flatten").

    Args (besides the base's): depth, drop_path_rate, drop_path_decay (linear ramp over pairs), legacy_norm
    (pre-head LayerNorm, needed by every released checkpoint), init_weights ("original": proj_down init with
    num_blocks=1 as trained; "original-fixed": num_blocks = 2 * depth), block_design (the traversals of each
    sub-block: "alternating", "uni", "bi", "bi_shared", "quad", "quad_shared"; see
    :mod:`ssl_vil.backbones.designs`; every design keeps ``depth`` pairs of two residual sub-blocks).
    """

    _final_norm_name = "norm"
    _blocks_per_decay_layer = 1

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        stride: int | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        dim: int = 192,
        depth: int = 12,
        pooling: str = "bilateral_concat",
        global_pool: str | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        drop_path_decay: bool = False,
        legacy_norm: bool = False,
        init_weights: str = "original",
        mlstm_backend: str = "auto",
        mlstm_chunk_size: int = 64,
        mask_token: bool = False,
        conv_kind: str = "2d",
        block_design: str = DEFAULT_BLOCK_DESIGN,
        cls_token: str | None = None,
    ) -> None:
        check_block_design(block_design)
        if conv_kind != "2d":
            raise ValueError(
                f"VisionLSTM2 supports conv_kind='2d' only (no released model uses another), got {conv_kind!r}"
            )
        if init_weights not in INIT_WEIGHTS:
            raise ValueError(f"init_weights must be one of {INIT_WEIGHTS}, got {init_weights!r}")
        if depth == 24 and dim < 1024:
            warnings.warn("VisionLSTM2 depth counts block pairs; depth=24 looks like a v1 depth (ViL-T/S/B use 12)")
        super().__init__(img_size=img_size, patch_size=patch_size, stride=stride, in_chans=in_chans,
                         num_classes=num_classes, dim=dim, pooling=global_pool or pooling, drop_rate=drop_rate,
                         legacy_norm=legacy_norm, mlstm_backend=mlstm_backend, mlstm_chunk_size=mlstm_chunk_size,
                         mask_token=mask_token, cls_token=cls_token)
        self.depth = depth
        self.init_weights = init_weights
        self.block_design = block_design
        proj_down_blocks = 1 if init_weights == "original" else 2 * depth
        rates = drop_path_rates(depth, drop_path_rate, "linear" if drop_path_decay else "uniform")
        self.blocks = nn.ModuleList(
            ViLBlockPair(dim, drop_path=rate, design=block_design, bias=True, conv_kind="2d",
                         proj_down_blocks=proj_down_blocks, backend=mlstm_backend, chunk_size=mlstm_chunk_size)
            for rate in rates
        )
        self.feature_info = self._feature_info()
        self.norm = ResidualLayerNorm(dim, bias=True, eps=1e-6)
        self._head_norm_name = "legacy_norm" if legacy_norm else None
        if legacy_norm:
            self.legacy_norm = nn.LayerNorm(self.head_hidden_size, eps=1e-5)
        self.head = self._make_head()


class VisionLSTM(_VisionLSTMBase):
    """Vision-LSTM v1. Input (B, C, H, W); ``depth`` = number of single blocks (official ViL-T/S/B: 24).

    Block i processes the sequence reversed iff i is odd; causal depthwise conv1d (k=4); no biases in
    projections and norms. Default pooling: bilateral average. ``stride`` < ``patch_size`` gives overlapping
    patches (official long-sequence models: stride 8). ``init_weights="original-fixed"`` uses
    num_blocks = depth for the proj_down init.
    """

    _blocks_per_decay_layer = 2

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        stride: int | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        dim: int = 192,
        depth: int = 24,
        pooling: str = "bilateral_avg",
        global_pool: str | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        drop_path_decay: bool = False,
        legacy_norm: bool = False,
        init_weights: str = "original",
        mlstm_backend: str = "auto",
        mlstm_chunk_size: int = 64,
        mask_token: bool = False,
        cls_token: str | None = None,
    ) -> None:
        if init_weights not in INIT_WEIGHTS:
            raise ValueError(f"init_weights must be one of {INIT_WEIGHTS}, got {init_weights!r}")
        super().__init__(img_size=img_size, patch_size=patch_size, stride=stride, in_chans=in_chans,
                         num_classes=num_classes, dim=dim, pooling=global_pool or pooling, drop_rate=drop_rate,
                         legacy_norm=legacy_norm, mlstm_backend=mlstm_backend, mlstm_chunk_size=mlstm_chunk_size,
                         mask_token=mask_token, cls_token=cls_token)
        self.depth = depth
        self.init_weights = init_weights
        proj_down_blocks = 1 if init_weights == "original" else depth
        rates = drop_path_rates(depth, drop_path_rate, "linear" if drop_path_decay else "uniform")
        self.blocks = nn.ModuleList(
            ViLBlock(dim, drop_path=rate, bias=False, flip=index % 2 == 1, conv_kind="causal1d",
                     proj_down_blocks=proj_down_blocks, backend=mlstm_backend, chunk_size=mlstm_chunk_size)
            for index, rate in enumerate(rates)
        )
        self.feature_info = self._feature_info()
        if legacy_norm:
            self._final_norm_name, self._head_norm_name = "legacy_norm", "norm"
            self.legacy_norm = ResidualLayerNorm(dim, bias=False, eps=1e-5)
            self.norm = nn.LayerNorm(self.head_hidden_size, eps=1e-6)
        else:
            self._final_norm_name, self._head_norm_name = "norm", None
            self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = self._make_head()
