"""Student/teacher self-distillation: DINO, iBOT and DINOv2 are one objective with different loss weights.

Per micro-batch, :meth:`SelfDistillationObjective.forward` runs the teacher (no grad) on the unmasked global
crops and the student on the masked global crops and the local crops, and returns the weighted loss, its
terms and diagnostics. Loss state changes only at optimizer-step boundaries, called by the trainer:

    out = objective(batch, teacher_temp=...)        # any number of micro-batches
    out["loss"].backward()
    optimizer.step()
    objective.update_teacher(momentum)              # EMA of student -> teacher
    objective.commit_step()                         # centers move once, from all micro-batches and ranks
    # or, for a skipped step: objective.discard_step()

Centers, pending center sums, student and teacher are all in ``state_dict()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ssl_vil.backbones.pooling import allowed_poolings, canonical_pooling, pooled_dim, token_layout
from ssl_vil.config.engine import Config
from ssl_vil.config.errors import invalid
from ssl_vil.heads import DINOHead, DINOHeadConfig, check_head_sharing
from ssl_vil.losses import (
    EMACenter,
    centered_teacher_probs,
    dino_cross_entropy,
    ibot_patch_loss,
    koleo_loss,
    sinkhorn_knopp,
)
from ssl_vil.infra.dist import is_distributed
from ssl_vil.objectives.network import SSLNetwork
from ssl_vil.objectives.teacher import ema_update, make_teacher

Centering = Literal["ema", "sinkhorn_knopp"]
# auto: the backbone's default. ViL: bilateral_concat (default), bilateral_avg, avg, middle_patch (= middle),
# middle_cls, first, last; ViT: cls (default), avg. See ssl_vil.backbones.pooling.
Pooling = Literal["auto", "bilateral_concat", "bilateral_avg", "avg", "middle_patch", "middle_cls", "first", "last",
                  "middle", "cls"]
CENTERING_MODES: tuple[str, ...] = get_args(Centering)


@dataclass(kw_only=True, slots=True)
class ObjectiveConfig(Config):
    """Settings of a :class:`SelfDistillationObjective`; the run config's ``objective:`` section.

    DINO, iBOT and DINOv2 are settings of this one class (the recipes state them): DINO has
    ``ibot_weight = koleo_weight = 0``, iBOT ``koleo_weight = 0``, DINOv2 weights 1 / 1 / 0.1.

    Attributes:
        pooling: pooled representation ("[CLS]") for the DINO head and KoLeo; see ``ssl_vil.backbones.pooling``.
            ``auto``: the backbone's default (ViL: ``bilateral_concat``; ViT: ``cls``); the run config loader
            states it. ``middle_cls`` builds the ViL with its learned middle token.
        dino_head: DINO head settings.
        ibot_head: iBOT head settings; None: the same settings as ``dino_head``. Unused when ``shared_head``.
        shared_head: one head for both losses (needs pooled width == token width).
        centering: teacher normalisation, "ema" (centering) or "sinkhorn_knopp".
        center_momentum: EMA momentum of the centers.
        sinkhorn_iterations: Sinkhorn-Knopp iterations.
        student_temp: student softmax temperature.
        teacher_temp: teacher temperature after its warmup; warmup_teacher_temp: at step 0 (linear in between,
            over ``schedule.teacher_temp_warmup_*``).
        dino_weight / ibot_weight / koleo_weight: loss weights; a zero weight removes the term (and, for
            iBOT, the patch head, the student masking and the backbone's mask token).
        koleo_eps: KoLeo distance floor.
    """

    pooling: Pooling = "auto"
    dino_head: DINOHeadConfig = field(default_factory=DINOHeadConfig)
    ibot_head: DINOHeadConfig | None = None
    shared_head: bool = False
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    koleo_eps: float = 1e-8
    centering: Centering = "ema"
    center_momentum: float = 0.9
    sinkhorn_iterations: int = 3
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04

    def validate(self) -> None:
        for name in ("dino_weight", "ibot_weight", "koleo_weight"):
            if getattr(self, name) < 0:
                raise invalid(name, getattr(self, name), "a non-negative loss weight")
        if self.dino_weight == 0:
            raise invalid("dino_weight", self.dino_weight, "a positive weight (the image-level loss drives training)")
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            if getattr(self, name) <= 0:
                raise invalid(name, getattr(self, name), "a positive temperature")
        if not 0.0 <= self.center_momentum < 1.0:
            raise invalid("center_momentum", self.center_momentum, "a momentum in [0, 1)")
        if self.sinkhorn_iterations < 1:
            raise invalid("sinkhorn_iterations", self.sinkhorn_iterations, "a positive integer")
        if not self.koleo_eps > 0:
            raise invalid("koleo_eps", self.koleo_eps, "a positive float")
        if self.shared_head and not self.uses_ibot:
            raise invalid("shared_head", True, "false when ibot_weight is 0 (there is no iBOT head to share)")
        if self.shared_head and self.ibot_head is not None and self.ibot_head != self.dino_head:
            raise invalid("shared_head", True, "false, or ibot_head null or equal to dino_head (one head serves both)")

    @property
    def uses_ibot(self) -> bool:
        return self.ibot_weight > 0

    @property
    def uses_koleo(self) -> bool:
        return self.koleo_weight > 0


def build_objective(backbone: nn.Module, cfg: ObjectiveConfig) -> SelfDistillationObjective:
    """The objective around the student ``backbone``; it needs a mask token iff ``cfg.ibot_weight > 0``."""
    return SelfDistillationObjective(backbone, cfg)


class SelfDistillationObjective(nn.Module):
    """Owns the student (:class:`SSLNetwork`), its EMA teacher and the loss centers.

    Backbone parameters that never see a gradient here -- the classification path (the pre-head norm of
    released ViL checkpoints, ``legacy_norm``, and a classifier) and, without the patch loss, the mask
    token -- are frozen and listed in ``frozen_backbone_parameters``, so that DDP does not wait for them.
    """

    def __init__(self, backbone: nn.Module, cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.cfg = cfg
        token_dim = int(backbone.embed_dim)
        self.pooling = pooling = backbone_pooling(backbone, cfg.pooling)
        in_dim = pooled_dim(token_dim, pooling)
        shared = cfg.uses_ibot and cfg.shared_head
        if cfg.uses_ibot:
            check_head_sharing(in_dim, token_dim, cfg.shared_head)
            if getattr(backbone, "mask_token", None) is None:
                raise ValueError(
                    "the masked-patch loss needs a backbone with a mask token (create it with mask_token=True)"
                )
        self.frozen_backbone_parameters = _freeze_unused(backbone, uses_masks=cfg.uses_ibot)
        dino_head = DINOHead(in_dim, cfg.dino_head)
        ibot_head = None
        if cfg.uses_ibot and not shared:
            ibot_head = DINOHead(token_dim, cfg.ibot_head if cfg.ibot_head is not None else cfg.dino_head)
        self.student = SSLNetwork(backbone, dino_head, ibot_head, pooling=pooling, share_head=shared)
        self.teacher = make_teacher(self.student)
        self.teacher.backbone.eval()
        self.dino_center: EMACenter | None = None
        self.ibot_center: EMACenter | None = None
        if cfg.centering == "ema":
            self.dino_center = EMACenter(dino_head.out_dim, cfg.center_momentum)
            if cfg.uses_ibot:
                patch_head = self.student.patch_head
                assert patch_head is not None
                self.ibot_center = EMACenter(patch_head.out_dim, cfg.center_momentum)
        # The callable used for the student forward; a trainer may route it through wrappers of ``self.student``
        # (DDP, torch.compile). Stored outside the module tree so it never enters state_dict().
        object.__setattr__(self, "_student_forward", self.student)
        # Whether the teacher and the centers were made equal across ranks (once, at the first wrap or shard).
        object.__setattr__(self, "_ranks_synced", False)

    # ------------------------------------------------------------------------------------------ trainer API
    def wrap_student(self, wrapper: Callable[[nn.Module], nn.Module]) -> nn.Module:
        """Route the student forward through ``wrapper(forward)``, where ``forward`` is what it goes through now:
        the student, or an earlier wrapper, so that wrappers compose (``torch.compile(DDP(student))``).

        With a process group, the teacher and the centers are broadcast from rank 0 as well (once): DDP makes the
        student replicas equal, and the teacher (copied from each rank's own initial student) must follow,
        or ranks would distil from different teachers and a resumed run (one saved teacher) would diverge.
        """
        wrapped = wrapper(self._student_forward)
        object.__setattr__(self, "_student_forward", wrapped)
        if is_distributed() and not self._ranks_synced:
            self._broadcast_non_student_state()
        return wrapped

    def shard_student_and_teacher(self, shard: Callable[[SSLNetwork], None]) -> nn.Module:
        """Shard the student and the teacher in place with the same plan ``shard`` (FSDP2's ``fully_shard`` per
        block, head and root; see ``ssl_vil.train.fsdp``); returns the student, now what the forward goes through.

        Before sharding, every rank's student, teacher and centers are made equal to rank 0's (the broadcast DDP
        does for the student, and :meth:`wrap_student` for the rest): each rank keeps its slice of its *own* full
        tensors, so those must agree. Sharding both networks alike makes the EMA a per-shard update.
        """
        if self._student_forward is not self.student:
            raise RuntimeError("shard_student_and_teacher must come before any wrap_student (e.g. DDP)")
        if is_distributed():
            self._broadcast_tensors(chain(self.student.parameters(), self.student.buffers()))
            self._broadcast_non_student_state()
        shard(self.student)
        shard(self.teacher)
        object.__setattr__(self, "_student_forward", self.student)
        return self.student

    @torch.no_grad()
    def _broadcast_non_student_state(self) -> None:
        tensors = list(self.teacher.parameters()) + list(self.teacher.buffers())
        for center in self._centers():
            tensors += list(center.buffers())
        self._broadcast_tensors(tensors)
        object.__setattr__(self, "_ranks_synced", True)

    @staticmethod
    @torch.no_grad()
    def _broadcast_tensors(tensors: Iterable[Tensor]) -> None:
        for tensor in tensors:
            dist.broadcast(tensor, src=0)

    def train(self, mode: bool = True) -> SelfDistillationObjective:
        """Student and teacher heads follow ``mode``; the teacher backbone always runs in eval mode (no
        stochastic depth or dropout in the teacher, as the original recipes build it without them). Teacher
        heads stay in train mode so that BatchNorm (if enabled) uses batch statistics, as in DINO."""
        super().train(mode)
        self.teacher.backbone.eval()
        return self

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA step teacher <- momentum·teacher + (1 - momentum)·student, after an optimizer step."""
        ema_update(self.teacher, self.student, momentum)

    def commit_step(self) -> None:
        """Apply the center updates accumulated since the last commit (once per optimizer step)."""
        for center in self._centers():
            center.commit()

    def discard_step(self) -> None:
        """Forget the pending center updates of a skipped optimizer step."""
        for center in self._centers():
            center.discard()

    def _centers(self) -> list[EMACenter]:
        return [c for c in (self.dino_center, self.ibot_center) if c is not None]

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, batch: dict[str, Any], *, teacher_temp: float) -> dict[str, Tensor]:
        """Loss and diagnostics of one (micro-)batch from ``ssl_vil.objectives.masking.MultiCropMaskCollate``.

        Returns scalar tensors: ``loss`` (weighted total), ``dino``, ``ibot``, ``koleo`` (unweighted; 0 when
        off), ``teacher_entropy`` (mean entropy of the DINO teacher targets, nats), ``teacher_entropy_ratio``
        (entropy / ln K; 1 = uniform collapse), ``student_teacher_kl`` (mean KL(teacher || student) over the
        DINO view pairs), ``center_norm`` (L2 norm of the DINO center; 0 with Sinkhorn-Knopp),
        ``mask_ratio`` (masked fraction of global-crop patches).
        """
        cfg = self.cfg
        global_crops: Tensor = batch["global_crops"]
        local_crops: Tensor | None = batch.get("local_crops")
        batch_size = int(batch["labels"].shape[0])
        n_global = global_crops.shape[0] // batch_size
        n_local = 0 if local_crops is None else local_crops.shape[0] // batch_size
        if n_global * batch_size != global_crops.shape[0]:
            raise ValueError(
                f"global_crops has {global_crops.shape[0]} rows, not a multiple of the batch size {batch_size}"
            )

        masks = mask_indices = mask_weights = valid = None
        if cfg.uses_ibot:
            masks, mask_indices, mask_weights, valid = self._patch_targets(batch)

        with torch.no_grad():
            teacher_out = self.teacher(global_crops, None, None, mask_indices)
            teacher_probs = self._teacher_targets(teacher_out["global_logits"], teacher_temp, None, self.dino_center)
            teacher_patch_probs = None
            if cfg.uses_ibot:
                teacher_patch_probs = self._teacher_targets(
                    teacher_out["patch_logits"], teacher_temp, valid, self.ibot_center
                )

        student_out = self._student_forward(global_crops, local_crops, masks, mask_indices)
        student_logits = student_out["global_logits"]
        if student_out["local_logits"] is not None:
            student_logits = torch.cat([student_logits, student_out["local_logits"]], dim=0)
        dino = dino_cross_entropy(
            student_logits,
            teacher_probs,
            n_student_views=n_global + n_local,
            n_teacher_views=n_global,
            student_temp=cfg.student_temp,
        )
        zero = dino.new_zeros(())
        ibot = koleo = zero
        if cfg.uses_ibot:
            assert teacher_patch_probs is not None and mask_weights is not None
            ibot = ibot_patch_loss(
                student_out["patch_logits"],
                teacher_patch_probs,
                mask_weights,
                n_images=n_global * batch_size,
                student_temp=cfg.student_temp,
            )
        if cfg.uses_koleo:
            # Per global view, as DINOv2 (summed over views): neighbours are searched within one view.
            koleo = sum(koleo_loss(chunk, cfg.koleo_eps) for chunk in student_out["global_pooled"].chunk(n_global))
        loss = cfg.dino_weight * dino + cfg.ibot_weight * ibot + cfg.koleo_weight * koleo

        with torch.no_grad():
            entropy = -torch.special.xlogy(teacher_probs, teacher_probs).sum(dim=-1).mean()
            diagnostics = {
                "teacher_entropy": entropy,
                "teacher_entropy_ratio": entropy / math.log(teacher_probs.shape[-1]),
                # Every teacher view appears in the same number of pairs, so the pair-mean KL is the
                # pair-mean cross-entropy minus the mean teacher entropy.
                "student_teacher_kl": dino.detach() - entropy,
                "center_norm": self.dino_center.center.norm() if self.dino_center is not None else zero,
                "mask_ratio": masks.float().mean() if masks is not None else zero,
            }
        return {"loss": loss, "dino": dino, "ibot": ibot, "koleo": koleo, **diagnostics}

    def _patch_targets(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Masks and (possibly trimmed) index buffers; padding rows are marked invalid."""
        masks: Tensor = batch["masks"]
        mask_indices: Tensor = batch["mask_indices"]
        mask_weights: Tensor = batch["mask_weights"]
        n_masked: Tensor = batch["n_masked"]
        patch_head = self.student.patch_head
        assert patch_head is not None
        if patch_head.has_batch_norm:
            # Padding rows would enter the BatchNorm statistics: trim to the real masked tokens (host sync).
            count = int(n_masked)
            mask_indices, mask_weights = mask_indices[:count], mask_weights[:count]
        positions = torch.arange(mask_indices.shape[0], device=mask_indices.device)
        valid = positions < n_masked.to(mask_indices.device)
        return masks, mask_indices, mask_weights, valid

    def _teacher_targets(
        self, logits: Tensor, teacher_temp: float, valid: Tensor | None, center: EMACenter | None
    ) -> Tensor:
        if self.cfg.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, teacher_temp, self.cfg.sinkhorn_iterations, valid)
        assert center is not None
        probs = centered_teacher_probs(logits, center.center, teacher_temp)
        center.accumulate(logits, valid)
        return probs



def backbone_pooling(backbone: nn.Module, pooling: str | None) -> str:
    """``pooling`` checked against what ``backbone`` supports ("auto" or None: its default); raises ValueError."""
    layout = token_layout(backbone)
    is_vit = layout.num_prefix_tokens > 0 or hasattr(backbone, "vit")
    allowed = allowed_poolings(is_vit=is_vit, has_class_token=layout.has_class_token)
    if pooling in (None, "auto"):
        return "middle_cls" if layout.middle_cls else allowed[0]
    if pooling not in allowed:
        raise ValueError(f"pooling {pooling!r} does not apply to a {type(backbone).__name__} backbone; expected one "
                         f"of {', '.join(allowed)}")
    if (canonical_pooling(pooling) == "middle_cls") != layout.middle_cls:
        raise ValueError(f"pooling {pooling!r} and the backbone's middle token disagree: build the ViL with "
                         f"cls_token='middle' exactly when the pooling is 'middle_cls'")
    return pooling


def _freeze_unused(backbone: nn.Module, *, uses_masks: bool) -> list[str]:
    """Freeze parameters the objective never uses; returns their names.

    Those are the parameters applied after ``forward_features`` (pre-head norm, classifier) and, when the
    student is never masked, the mask token.
    """
    modules = []
    head_norm = getattr(backbone, "head_norm", None)
    if isinstance(head_norm, nn.Module):
        modules.append(head_norm)
    if hasattr(backbone, "get_classifier"):
        classifier = backbone.get_classifier()
        if isinstance(classifier, nn.Module):
            modules.append(classifier)
    unused = {id(p) for m in modules for p in m.parameters()}
    mask_token = getattr(backbone, "mask_token", None)
    if not uses_masks and isinstance(mask_token, nn.Parameter):
        unused.add(id(mask_token))
    names = []
    for name, param in backbone.named_parameters():
        if id(param) in unused:
            param.requires_grad_(False)
            names.append(name)
    return names
