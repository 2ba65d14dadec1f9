"""The EMA teacher: a gradient-free copy of the student (backbone and heads) updated by momentum.

The teacher is created by deep-copying the student so that both start identical, heads included (building
the teacher heads separately starts them from different random weights). Storage is asserted disjoint:
a teacher that aliases the student silently turns self-distillation into distilling the student into itself.
"""

from __future__ import annotations

import copy
from itertools import chain

import torch
from torch import Tensor, nn

from ssl_vil.infra.dist import is_dtensor


def make_teacher(student: nn.Module) -> nn.Module:
    """Deep copy of ``student`` with ``requires_grad=False`` everywhere and storage disjoint from it."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    assert_disjoint_storage(student, teacher)
    return teacher


def _storages(module: nn.Module) -> dict[int, str]:
    named = chain(module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False))
    return {t.untyped_storage().data_ptr(): name for name, t in named if t.numel() > 0}


def assert_disjoint_storage(student: nn.Module, teacher: nn.Module) -> None:
    """Raise ``AssertionError`` naming the first parameter/buffer that shares memory between the two modules."""
    student_storages = _storages(student)
    for ptr, name in _storages(teacher).items():
        if ptr in student_storages:
            raise AssertionError(
                f"teacher tensor {name!r} shares storage with student tensor {student_storages[ptr]!r}; "
                "the teacher must be an independent copy"
            )


def _paired_parameters(teacher: nn.Module, student: nn.Module) -> tuple[list[str], list[Tensor], list[Tensor]]:
    teacher_params = dict(teacher.named_parameters())
    student_params = dict(student.named_parameters())
    if teacher_params.keys() != student_params.keys():
        missing = sorted(student_params.keys() ^ teacher_params.keys())
        raise ValueError(f"teacher and student parameters differ in name: {missing[:5]}")
    names = list(student_params)
    return names, [teacher_params[n] for n in names], [student_params[n].detach() for n in names]


def _local_shards(teacher_params: list[Tensor], student_params: list[Tensor], names: list[str]
                  ) -> tuple[list[Tensor], list[Tensor]]:
    """The local tensors to update: the parameters themselves, or, for FSDP2-sharded (DTensor) parameters, this
    rank's shards. The EMA is elementwise, so shard i of the teacher needs only shard i of the student; that holds
    when both are sharded alike (same mesh and placements), which is checked rather than assumed."""
    if not any(is_dtensor(t) for t in (*teacher_params, *student_params)):
        return teacher_params, student_params
    local_t, local_s = [], []
    for name, t, s in zip(names, teacher_params, student_params):
        if not (is_dtensor(t) and is_dtensor(s) and t.device_mesh == s.device_mesh
                and t.placements == s.placements and t.to_local().shape == s.to_local().shape):
            raise ValueError(f"teacher and student parameter {name!r} are not sharded alike (teacher "
                             f"{_layout(t)}, student {_layout(s)}); shard both networks with the same plan")
        # to_local() is a view of the shard: the in-place lerp below writes the teacher's own storage.
        local_t.append(t.to_local())
        local_s.append(s.to_local())
    return local_t, local_s


def _layout(t: Tensor) -> str:
    placements = getattr(t, "placements", None)
    return f"sharded {placements}" if placements is not None else f"a plain tensor of shape {tuple(t.shape)}"


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for every parameter (paired by name).

    Buffers (e.g. BatchNorm running statistics) are left to the teacher's own forward passes, as in DINO.
    ``momentum = 1`` leaves the teacher bitwise unchanged; ``momentum = 0`` copies the student. FSDP2-sharded
    networks (DTensor parameters, sharded alike) are updated shard by shard, without any communication; the
    result equals the EMA of the full tensors bitwise.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum!r}")
    names, teacher_params, student_params = _paired_parameters(teacher, student)
    teacher_params, student_params = _local_shards(teacher_params, student_params, names)
    # lerp(t, s, w) = t + w * (s - t); with w = 0 this adds an exact zero.
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)
