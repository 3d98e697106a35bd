""" Deployment: torch.compile without graph breaks or recompiles, TorchScript, ONNX + onnxruntime. """
import pytest
import timm
import torch
import torch.nn as nn

import timm_tcnn  # noqa: F401  (registers the models)
from timm_tcnn import GatedPositionalAttention2d, conv_to_attention
from timm_tcnn.models.convert import attention_layers
from timm_tcnn.tools.analysis import content_logits
from helpers import relative_error


def open_gates(model: nn.Module) -> nn.Module:
    layers = [model] if isinstance(model, GatedPositionalAttention2d) else [m for _, m in attention_layers(model)]
    with torch.no_grad():
        for layer in layers:
            layer.set_attention_values(content_gate=torch.empty_like(layer.content_gate).uniform_(0.2, 0.8))
            layer.set_attention_values(locality_gate=torch.empty_like(layer.locality_gate).uniform_(0.2, 0.8))
            layer.set_attention_values(pos_log_alpha=torch.empty_like(layer.pos_log_alpha).uniform_(-1., 0.))
            layer.qk.weight.view(layer.num_heads, 2, -1)[:, 0].normal_(std=0.2)
    return model


def small_tcnn() -> nn.Module:
    """tcnn_resnet50rs with one block per stage, stages 3 and 4 converted (strided convs included)."""
    model = timm.create_model('tcnn_resnet50rs', layers=(1, 1, 1, 1), tcnn_stages=(3, 4), num_classes=10)
    return open_gates(model).eval()


class CountingBackend:
    """A torch.compile backend that runs the captured graph eagerly and counts compilations."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize('stride,block_bytes', [(1, 8 * 2 ** 20), (2, 3000)])
def test_compile_fullgraph_no_recompile(stride, block_bytes):
    layer = open_gates(conv_to_attention(nn.Conv2d(6, 5, 3, stride, 1)))
    layer.attention_block_bytes = block_bytes  # 3000: several query blocks
    backend = CountingBackend()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)  # fullgraph: a graph break raises
    x = torch.randn(2, 6, 9, 7, requires_grad=True)
    ref = layer(x)
    for _ in range(3):
        out = compiled(x)
        out.sum().backward()
        assert relative_error(out, ref) <= 1e-6
    with torch.no_grad():
        for _ in range(3):
            assert relative_error(compiled(x), ref) <= 1e-6
    assert backend.graphs == 2  # once with autograd, once without; never again for the same shape


def test_compiled_model_has_no_graph_break():
    model = small_tcnn()
    explanation = torch._dynamo.explain(model)(torch.randn(1, 3, 64, 64))
    assert explanation.graph_break_count == 0


def test_torchscript_layer_and_model():
    layer = open_gates(conv_to_attention(nn.Conv2d(6, 5, 3, 2, 1)))
    layer.attention_block_bytes = 3000  # several query blocks
    x = torch.randn(2, 6, 9, 7)
    scripted = torch.jit.script(layer)
    assert relative_error(scripted(x), layer(x)) <= 1e-6
    model = small_tcnn()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(images)  # fills the eager inference caches, which scripting must ignore
    scripted = torch.jit.script(model)
    with torch.no_grad():
        assert relative_error(scripted(images), model(images)) <= 1e-5


def _onnx_parity(module: nn.Module, x: torch.Tensor, path) -> float:
    onnxruntime = pytest.importorskip('onnxruntime')
    pytest.importorskip('onnxscript')
    torch.onnx.export(module, (x,), str(path), dynamo=True)
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref = module(x)
    return relative_error(torch.from_numpy(out), ref)


def test_onnx_layer_matches_onnxruntime(tmp_path):
    layer = open_gates(conv_to_attention(nn.Conv2d(6, 5, 3, 2, 1))).eval()
    layer.attention_block_bytes = 3000  # several query blocks
    assert _onnx_parity(layer, torch.randn(2, 6, 9, 7), tmp_path / 'layer.onnx') <= 1e-4


@pytest.mark.slow
def test_onnx_model_matches_onnxruntime(tmp_path):
    assert _onnx_parity(small_tcnn(), torch.randn(2, 3, 64, 64), tmp_path / 'model.onnx') <= 1e-4


def test_compiled_gradients_match_eager():
    """Compiled graphs (functional: the logit raise runs out of place there) give the eager outputs and
    gradients, in a state where the raise applies (sharp logits)."""
    layer = open_gates(conv_to_attention(nn.Conv2d(6, 5, 3, 1, 1)))
    with torch.no_grad():
        layer.qk.weight.mul_(30.)
    x = torch.randn(2, 6, 9, 7, requires_grad=True)
    assert (content_logits(layer, x).detach().amax(-1) - content_logits(layer, x).detach().amin(-1) > 40).any()
    compiled = torch.compile(layer, backend='aot_eager', fullgraph=True)
    target = torch.randn(2, 5, 9, 7)
    params = [x] + list(layer.parameters())
    grads = [torch.autograd.grad((module(x) * target).sum(), params) for module in (layer, compiled)]
    assert relative_error(compiled(x), layer(x)) <= 1e-5  # the same maths in other operations: float32 rounding
    for eager_grad, compiled_grad in zip(*grads):
        assert relative_error(compiled_grad, eager_grad) <= 1e-5
