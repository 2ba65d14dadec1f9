"""EMA teacher: exact copy with disjoint storage, no gradients, EMA arithmetic."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import ssl_vil  # noqa: F401  (registers the ViL models)
from ssl_vil.heads import DINOHead, DINOHeadConfig
from ssl_vil.objectives import SSLNetwork
from ssl_vil.objectives.teacher import assert_disjoint_storage, ema_update, make_teacher


def _student(seed=0) -> SSLNetwork:
    torch.manual_seed(seed)
    backbone = timm.create_model(
        "vil2_tiny_patch16_224", img_size=32, patch_size=4, dim=64, depth=2, num_classes=0, mask_token=True
    )
    head_cfg = DINOHeadConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, batch_norm=True)
    return SSLNetwork(backbone, DINOHead(128, head_cfg), DINOHead(64, head_cfg), pooling="bilateral_concat")


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def test_teacher_is_an_equal_independent_gradient_free_copy():
    student = _student()
    teacher = make_teacher(student)
    s_state, t_state = student.state_dict(), teacher.state_dict()
    assert s_state.keys() == t_state.keys() and len(s_state) > 20
    floats = [k for k in s_state if s_state[k].is_floating_point()]
    assert all(torch.equal(_as_bits(s_state[k]), _as_bits(t_state[k])) for k in floats)
    assert all(not p.requires_grad for p in teacher.parameters())
    s_ptrs = {t.untyped_storage().data_ptr() for t in list(student.parameters()) + list(student.buffers())}
    t_tensors = list(teacher.parameters()) + list(teacher.buffers())
    assert all(t.untyped_storage().data_ptr() not in s_ptrs for t in t_tensors)
    with torch.no_grad():
        next(student.parameters()).add_(1.0)
    assert not torch.equal(next(student.parameters()), next(teacher.parameters()))


def test_aliasing_is_detected():
    student = _student()
    alias = make_teacher(student)
    alias.dino_head = student.dino_head  # one shared submodule is enough to break self-distillation
    with pytest.raises(AssertionError, match="dino_head.*shares storage"):
        assert_disjoint_storage(student, alias)


def test_ema_momentum_one_is_bitwise_identity_and_zero_copies_the_student():
    student, teacher = _student(0), make_teacher(_student(1))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 1.0)
    after = {k: v for k, v in teacher.state_dict().items() if v.is_floating_point()}
    assert all(torch.equal(_as_bits(before[k]), _as_bits(v)) for k, v in after.items())
    ema_update(teacher, student, 0.0)
    for (name, t), (_, s) in zip(teacher.named_parameters(), student.named_parameters()):
        assert torch.equal(t, s), name


def test_ema_formula_for_every_parameter():
    student, teacher = _student(0), make_teacher(_student(1))
    t_before = {n: p.detach().clone().double() for n, p in teacher.named_parameters()}
    t_buffers = {n: b.clone() for n, b in teacher.named_buffers()}
    ema_update(teacher, student, 0.9)
    for name, s in student.named_parameters():
        expected = 0.9 * t_before[name] + 0.1 * s.detach().double()
        torch.testing.assert_close(dict(teacher.named_parameters())[name].double(), expected, rtol=1e-6, atol=1e-7)
    # Buffers (BatchNorm statistics) are left alone.
    assert all(torch.equal(b, t_buffers[n]) for n, b in teacher.named_buffers())
    with pytest.raises(ValueError, match="momentum"):
        ema_update(teacher, student, 1.5)


def test_ema_requires_matching_parameter_names():
    a, b = nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="differ in name"):
        ema_update(a, b, 0.5)
