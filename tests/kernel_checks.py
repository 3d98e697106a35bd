""" The positional kernels run on CPU by Triton's interpreter, against the closed form: run as a script with
TRITON_INTERPRET=1 (which Triton reads when it is imported), printing one JSON object; `test_positional_kernels.py`
runs it and checks what it measured. """
import json
import math
import sys
import warnings

import torch
import torch.nn as nn

from timm_tcnn import conv_to_attention
from timm_tcnn.layers import positional_kernels, set_positional_kernels
from timm_tcnn.layers.positional import ClosedFormPositional, positional_tables, query_start
from timm_tcnn.tools.bench import spread_layer_state
from timm_tcnn.tools.op_count import OpCounter, layer_step_ops
from helpers import fine_tuned_layer, grads, plain_forward

# kernel size, stride, height, width, 'same' padding, grad floor
GEOMETRIES = [(3, 1, 5, 6, False, 0.1), (3, 2, 7, 6, True, 0.), (5, 1, 6, 5, False, 0.3), (3, 2, 1, 4, False, 0.1)]


def error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).detach().abs().max() / ref.detach().abs().max().clamp_min(1e-30))


def builders():
    """Each geometry: the kernels' P and values' gradient (a gradient floor, the content's gate gradient added)
    against the closed form's, for values spread over states fine-tuning reaches."""
    results = []
    generator = torch.Generator().manual_seed(0)
    for kernel_size, stride, height, width, same, floor in GEOMETRIES:
        heads = kernel_size * kernel_size
        values = torch.cat([
            torch.rand(heads, generator=generator) * (torch.arange(heads) % 2), torch.rand(heads, generator=generator),
            torch.linspace(math.log(0.05), math.log(20.), heads), torch.randn(2 * heads, generator=generator)])
        starts = query_start(height, kernel_size, stride, same), query_start(width, kernel_size, stride, same)
        kernels = positional_kernels.KernelPositional(kernel_size, stride, height, width, starts)
        closed = ClosedFormPositional(positional_tables(kernel_size, stride, height, width, same))
        ours, _ = kernels.forward(values, floor)
        theirs, saved = closed.forward(values, floor)
        grad = torch.randn(theirs.shape, generator=generator)
        content = torch.randn(heads, generator=generator)
        results.append(dict(
            geometry=[kernel_size, stride, height, width, same, floor],
            forward=error(ours, theirs),
            backward=error(kernels.backward(grad, values, (), floor, content),
                           closed.backward(grad, values, saved, floor, content)),
            backward_without_content=error(kernels.backward(grad, values, (), floor),
                                           closed.backward(grad, values, saved, floor))))
    return results


def layers():
    """Whole layers with the kernels: output against the plain reference, and output and the gradients of the input
    and every parameter against the closed form's (with a gradient floor); and that the kernels ran."""
    results = []
    for stride in (1, 2):
        layer = fine_tuned_layer(stride=stride)
        layer.grad_floor = 0.1
        x = torch.randn(2, 6, 7, 6, requires_grad=True)
        layer(x)  # first use: the kernels checked
        with OpCounter() as counter:
            out = layer(x)
        set_positional_kernels(False)
        try:
            closed = layer(x)
        finally:
            set_positional_kernels(True)
        target = torch.randn_like(out)
        grad_errors = [error(a, b) for a, b in zip(grads(layer, x, out, target), grads(layer, x, closed, target))]
        results.append(
            dict(
                stride=stride,
                forward=error(out, plain_forward(layer, x)),
                forward_closed=error(out, closed),
                gradients=max(grad_errors),
                kernel_launches=counter.ops['positional_attention'],
            )
        )
    return results


def operations():
    """Operations of one training step and one inference call at ResNet-50-RS stage-4 shapes (7x7, and the strided
    14x14 -> 7x7), half the content gates closed (the op-count test's state): float32 NCHW, and bf16 autocast on
    bf16 channels-last maps; along the paths the layer takes on CUDA, where the kernels run (queries projected at
    every position, NCHW inference projected channels first), counted here on CPU tensors."""
    results = {}
    for name, (channels, size, stride) in {'7x7': (512, 7, 1), '14x14 -> 7x7': (512, 14, 2)}.items():
        generator = torch.Generator().manual_seed(0)
        layer = conv_to_attention(
            nn.Conv2d(channels, channels, 3, stride, 1, bias=False), gate_lr_scale=30.0, grad_floor=0.1
        )
        layer.choices = layer.choices._replace(queries_everywhere=True, channels_first_projection=True)  # CUDA's
        x = torch.randn(2, channels, size, size, generator=generator)
        with torch.no_grad():
            spread_layer_state(layer, x, generator, 4.0, 0.5)
        float32 = layer_step_ops(layer, x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            bf16 = layer_step_ops(layer, x.to(torch.bfloat16, memory_format=torch.channels_last))
        results[name] = dict(float32=float32, bf16_channels_last=bf16)
    return results


def fallback():
    """Kernels that compute something else are refused on first use, with a warning; the layer stays exact."""
    right = positional_kernels.positional_attention
    positional_kernels.positional_attention = lambda values, *args: right(values, *args) * 1.001
    positional_kernels._CHECKED.clear()
    try:
        layer = fine_tuned_layer()
        x = torch.randn(2, 6, 5, 5, requires_grad=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            out = layer(x)
        return dict(
            warned=any('differ from the closed form' in str(w.message) for w in caught),
            forward=error(out, plain_forward(layer, x)),
        )
    finally:
        positional_kernels.positional_attention = right
        positional_kernels._CHECKED.clear()


if __name__ == '__main__':
    torch.manual_seed(0)
    json.dump(dict(builders=builders(), layers=layers(), operations=operations(), fallback=fallback()), sys.stdout)
