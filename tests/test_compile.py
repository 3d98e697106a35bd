""" torch.compile (inductor, on CPU) trains and evaluates a T-CNN as eager mode does, and a new batch size costs
one recompilation (the batch dimension then becomes dynamic), as it does for a CNN. """
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

from timm_tcnn import conv_to_attention
from helpers import relative_error


def small_tcnn() -> nn.Module:
    torch.manual_seed(0)
    layer = conv_to_attention(nn.Conv2d(16, 16, 3, 2, 1), qk_dim=8, gate_lr_scale=30., grad_floor=0.1)
    with torch.no_grad():
        layer.set_attention_values(content_gate=torch.linspace(0., 0.4, 9), locality_gate=0.2)
        layer.qk.weight.normal_(std=0.3)
    return nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(), layer,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def train_steps(model: nn.Module, forward, batches) -> list:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for x, y in batches:
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.filterwarnings('ignore::UserWarning')
def test_inductor_trains_and_evaluates_as_eager():
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, 3, 12, 12, generator=generator), torch.randint(4, (batch,), generator=generator))
               for batch in (4, 4, 3, 5)]
    eager = small_tcnn()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend='inductor')
    counters.clear()
    eager_losses = train_steps(eager.train(), eager, batches)
    compiled_losses = train_steps(compiled_model.train(), compiled, batches)
    for got, expected in zip(compiled_losses, eager_losses):
        assert abs(got - expected) <= 1e-4 * max(1., abs(expected))
    for (name, got), expected in zip(compiled_model.named_parameters(), eager.parameters()):
        assert relative_error(got, expected) <= 1e-4, name
    assert counters['stats']['unique_graphs'] <= 2  # batch 4, then one dynamic graph for every other batch
    eager.eval()
    compiled_model.eval()
    with torch.no_grad():
        for batch in (2, 7):
            x = torch.randn(batch, 3, 12, 12, generator=generator)
            assert relative_error(compiled(x), eager(x)) <= 1e-4
