"""Optimiser factory: fused steps where torch has them, the same update as the plain step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from carvana.training.optim import fused_supported, make_optimizer


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_cpu_parameters_get_the_fused_step_and_the_same_update(name):
    torch.manual_seed(0)
    a, b = nn.Linear(8, 4), nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    fused = make_optimizer(name, a.parameters(), lr=1e-2, weight_decay=1e-4)
    assert fused.param_groups[0]["fused"] is True
    plain_cls = type(fused)
    kwargs = {"momentum": 0.9, "nesterov": True} if name == "sgd" else {}
    plain = plain_cls(b.parameters(), lr=1e-2, weight_decay=1e-4, **kwargs)
    x = torch.randn(16, 8)
    for _ in range(3):
        for model, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


def test_fused_only_where_torch_supports_it():
    assert fused_supported([nn.Parameter(torch.zeros(2))])
    assert not fused_supported([])
    assert not fused_supported([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, device="meta"))])
    assert not fused_supported([nn.Parameter(torch.zeros(2, device="meta"))])


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        make_optimizer("lamb", nn.Linear(2, 2).parameters(), lr=1e-3, weight_decay=0.0)
