"""DINO projection head: structure, deepcopy / state_dict / torch.compile safety, frozen gain, head sharing."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from ssl_vil.heads import DINOHead, DINOHeadConfig, check_head_sharing

SMALL = DINOHeadConfig(out_dim=96, hidden_dim=48, bottleneck_dim=16)


def _cfg(**kw) -> DINOHeadConfig:
    base = dict(out_dim=96, hidden_dim=48, bottleneck_dim=16)
    base.update(kw)
    return DINOHeadConfig(**base)


@pytest.mark.parametrize(("n_layers", "batch_norm"), [(1, False), (2, True), (3, False), (3, True)])
def test_head_structure_and_output(n_layers, batch_norm):
    torch.manual_seed(0)
    head = DINOHead(32, _cfg(n_layers=n_layers, batch_norm=batch_norm))
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    norms = [m for m in head.mlp if isinstance(m, nn.BatchNorm1d)]
    assert len(linears) == n_layers
    assert len(norms) == (n_layers - 1 if batch_norm else 0)
    assert head.has_batch_norm == (batch_norm and n_layers > 1)
    assert linears[0].in_features == 32 and linears[-1].out_features == 16
    out = head(torch.randn(5, 32))
    assert out.shape == (5, 96)
    # Default g = 1 and L2-normalised bottleneck: logits are cosines in [-1, 1].
    assert out.abs().max() <= 1.0 + 1e-5
    names = {n for n, _ in head.named_parameters()}
    assert {"last_layer.parametrizations.weight.original0", "last_layer.parametrizations.weight.original1"} <= names


def test_head_survives_deepcopy_with_disjoint_storage():
    torch.manual_seed(0)
    head = DINOHead(32, _cfg(batch_norm=True))
    head.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the deprecated weight_norm warns; the parametrization must not
        clone = copy.deepcopy(head)
    x = torch.randn(4, 32)
    assert torch.equal(head(x), clone(x))
    ptrs = {p.untyped_storage().data_ptr() for p in head.parameters()}
    assert all(p.untyped_storage().data_ptr() not in ptrs for p in clone.parameters())
    with torch.no_grad():
        clone.last_layer.parametrizations.weight.original1.add_(1.0)
    assert not torch.equal(head(x), clone(x))


def test_head_state_dict_round_trip():
    torch.manual_seed(0)
    a = DINOHead(32, _cfg(batch_norm=True))
    torch.manual_seed(1)
    b = DINOHead(32, _cfg(batch_norm=True))
    x = torch.randn(6, 32)
    a(x)  # move BN running stats away from their init
    a.eval(), b.eval()
    assert not torch.equal(a(x), b(x))
    b.load_state_dict(a.state_dict(), strict=True)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("batch_norm", [False, True])
def test_head_compiles_without_graph_breaks(batch_norm):
    torch.manual_seed(0)
    head = DINOHead(32, _cfg(batch_norm=batch_norm)).train()
    compiled = torch.compile(head, backend="aot_eager", fullgraph=True)
    x = torch.randn(8, 32, requires_grad=True)
    expected = copy.deepcopy(head)(x)
    got = compiled(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    got.sum().backward()
    assert all(p.grad is not None for p in head.parameters() if p.requires_grad)


def test_norm_last_layer_freezes_the_gain():
    torch.manual_seed(0)
    head = DINOHead(32, _cfg(norm_last_layer=True))
    gain = head.last_layer.parametrizations.weight.original0
    direction = head.last_layer.parametrizations.weight.original1
    assert not gain.requires_grad and torch.equal(gain, torch.ones_like(gain))
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.5)
    before = direction.detach().clone()
    head(torch.randn(8, 32)).pow(2).sum().backward()
    opt.step()
    assert torch.equal(gain, torch.ones_like(gain)) and not torch.equal(direction, before)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(96))
    trainable = DINOHead(32, _cfg(norm_last_layer=False)).last_layer.parametrizations.weight.original0
    assert trainable.requires_grad


def test_head_rejects_bad_config_and_input():
    with pytest.raises(ValueError, match="out_dim"):
        DINOHeadConfig(out_dim=0)
    with pytest.raises(ValueError, match=r"inputs \(\.\.\., 32\)"):
        DINOHead(32, SMALL)(torch.randn(2, 31))


def test_check_head_sharing():
    check_head_sharing(64, 64, True)
    check_head_sharing(128, 64, False)
    with pytest.raises(ValueError, match="128 features and the patch tokens have 64"):
        check_head_sharing(128, 64, True)
