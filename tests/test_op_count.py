""" Operations one converted layer issues per training step and per inference call: on a GPU each costs host time
(a launch), whatever its size, so their number must not creep back. Counted at ResNet-50-RS stage-3/4 shapes in
the benchmark's spread state (half the content gates closed), one block of queries (the GPU's block size). """
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from timm_tcnn.layers import GatedPositionalAttention2d, default_block_bytes, set_positional_kernels
from timm_tcnn.layers.positional import TABLES
from timm_tcnn.tools.bench import LAYER_SHAPES, spread_layer_state
from timm_tcnn.tools.op_count import OpCounter, layer_step_ops

# at most, with the positional attention in its closed form (CPU; the Triton kernels' counts are in
# test_positional_kernels.py): (forward + backward of a training step, inference call), in float32 (NCHW or
# channels-last) and under bf16 autocast on bf16 channels-last maps (a GPU's training); the layer with autograd
# throughout (before its autograd functions) issued 231-269 and 24-37 in float32
LIMITS = {
    'resnet50rs stage 3, 14x14': {'float32': (68, 16), 'bf16': (70, 19)},
    'resnet50rs stage 3, 28x28 -> 14x14': {'float32': (77, 19), 'bf16': (79, 22)},
    'resnet50rs stage 4, 7x7': {'float32': (68, 16), 'bf16': (70, 19)},
}


def spread_layer(name: str, device=None) -> GatedPositionalAttention2d:
    channels, size, stride, kernel, groups = LAYER_SHAPES[name]
    layer = GatedPositionalAttention2d(
        channels, channels, kernel, stride, False, groups, grad_floor=0.1, gate_lr_scale=30.,
        attention_block_bytes=default_block_bytes(torch.device('cuda')), device=device)
    return layer


@pytest.mark.parametrize('setting', ['float32', 'float32 channels-last', 'bf16 channels-last'])
@pytest.mark.parametrize('name', list(LIMITS))
def test_operations_per_layer(name, setting):
    generator = torch.Generator().manual_seed(0)
    channels, size = LAYER_SHAPES[name][:2]
    layer = spread_layer(name)
    x = torch.randn(2, channels, size, size, generator=generator)
    with torch.no_grad():
        spread_layer_state(layer, x, generator, 4., 0.5)
    assert 0 < int((layer.content_share() > 0).sum()) < layer.num_heads  # open and closed heads
    precision = setting.split()[0]
    if setting.endswith('channels-last'):
        x = x.to(memory_format=torch.channels_last)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=precision == 'bf16'):
        forward, backward, inference = layer_step_ops(layer, x.to(torch.bfloat16) if precision == 'bf16' else x)
    train_limit, inference_limit = LIMITS[name][precision]
    assert forward + backward <= train_limit, (forward, backward)
    assert inference <= inference_limit


def test_gpu_forward_skips_the_subnormal_raise():
    """On a CUDA device (fake tensors: counted, never run) the forward pass issues three operations fewer per
    block of queries than on CPU: GPUs compute with subnormal numbers at full speed, so the logits are not raised."""
    name = 'resnet50rs stage 4, 7x7'
    channels, size = LAYER_SHAPES[name][:2]

    def forward_ops(device: str) -> OpCounter:
        layer = spread_layer(name, device=device)
        with torch.no_grad():
            layer.set_attention_values(content_gate=0.2)
        x = torch.randn(2, channels, size, size, device=device, requires_grad=True)
        layer(x)  # builds the shape tables
        with OpCounter() as counter:
            layer(x)
        return counter

    cpu = forward_ops('cpu')
    set_positional_kernels(False)  # the closed form on both devices (kernels cannot run on fake tensors)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            cuda = forward_ops('cuda')
    finally:
        set_positional_kernels(True)
        TABLES.clear()  # no fake tensors left for later tests
    assert cpu.total - cuda.total == 3
    assert cuda.ops['amax'] == 0 and cpu.ops['amax'] == 1
