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


def _paired_parameters(teacher: nn.Module, student: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    teacher_params = dict(teacher.named_parameters())
    student_params = dict(student.named_parameters())
    if teacher_params.keys() != student_params.keys():
        missing = sorted(student_params.keys() ^ teacher_params.keys())
        raise ValueError(f"teacher and student parameters differ in name: {missing[:5]}")
    names = list(student_params)
    return [teacher_params[n] for n in names], [student_params[n].detach() for n in names]


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for every parameter (paired by name).

    Buffers (e.g. BatchNorm running statistics) are left to the teacher's own forward passes, as in DINO.
    ``momentum = 1`` leaves the teacher bitwise unchanged; ``momentum = 0`` copies the student.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum!r}")
    teacher_params, student_params = _paired_parameters(teacher, student)
    # lerp(t, s, w) = t + w * (s - t); with w = 0 this adds an exact zero.
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)
