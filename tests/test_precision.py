""" Mixed precision: bf16 autocast stays finite and close to float32; fp16 logits cannot overflow. """
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_tcnn  # noqa: F401  (registers the models)
from timm_tcnn import conv_to_attention
from timm_tcnn.models.convert import attention_layers
from timm_tcnn.tools.analysis import content_logits
from helpers import randomize_batchnorm, relative_error

TEST_SIZE = 64
FP16_MAX = torch.finfo(torch.float16).max


def fine_tuned_tcnn() -> nn.Module:
    """A small converted tcnn_resnet50rs (stages 3 and 4), gates open, Q/K grown well past their init."""
    model = timm.create_model('tcnn_resnet50rs', layers=(1, 1, 1, 1), tcnn_stages=(3, 4), num_classes=10)
    randomize_batchnorm(model, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _, layer in attention_layers(model):
            layer.set_attention_values(content_gate=torch.empty_like(layer.content_gate).uniform_(0.2, 0.8))
            layer.set_attention_values(locality_gate=torch.empty_like(layer.locality_gate).uniform_(0.2, 0.8))
            layer.set_attention_values(pos_log_alpha=torch.empty_like(layer.pos_log_alpha).uniform_(-1., 0.))
            layer.qk.weight.normal_(std=0.1)
    return model.eval()


def test_bf16_autocast_forward_backward_close_to_float32():
    model = fine_tuned_tcnn()
    x = torch.randn(2, 3, TEST_SIZE, TEST_SIZE)
    target = torch.tensor([1, 7])
    ref = model(x)
    F.cross_entropy(ref, target).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)
        loss = F.cross_entropy(out, target)
    loss.backward()
    assert torch.isfinite(out).all()
    assert relative_error(out.float(), ref) <= 5e-2  # bf16 keeps 8 bits: ~4e-3 per op, ~50 ops deep
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    for name in ('layer4.0.conv2.content_gate', 'layer4.0.conv2.weight', 'layer3.0.conv2.qk.weight'):
        cosine = F.cosine_similarity(model.get_parameter(name).grad.flatten(), ref_grads[name].flatten(), dim=0)
        assert cosine > 0.9, (name, cosine)  # measured 0.945-0.946 for the gate and Q/K


def test_fp16_logits_beyond_fp16_range_do_not_overflow():
    """Logits of 1e5 (fp16 max is 65504): an fp16 QK^T would give inf and NaN; ours are float32."""
    layer = conv_to_attention(nn.Conv2d(8, 8, 3, padding=1))
    with torch.no_grad():
        layer.set_attention_values(content_gate=0.5)
        q_weight, k_weight = layer.query_key_weights()  # views, heads, d, C
        q_weight.copy_(torch.eye(8).repeat(4, 1) * 20)  # each head: q = 20 x, four times
        k_weight.copy_(q_weight)
    x = torch.full((1, 8, 5, 5), 10.) + torch.randn(1, 8, 5, 5)
    logits = content_logits(layer, x)
    assert logits.abs().max() > 2 * FP16_MAX
    tokens = x.flatten(2).half()
    q_weight, k_weight = (w.flatten(0, 1).half() for w in layer.query_key_weights())
    naive = (q_weight @ tokens).transpose(1, 2) @ (k_weight @ tokens)
    assert not torch.isfinite(naive).all()  # what an fp16 computation of the logits would do
    ref = layer(x)
    with torch.autocast('cpu', dtype=torch.float16):
        out = layer(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert relative_error(out.float(), ref) <= 1e-2


def test_fp16_autocast_at_four_times_the_test_size():
    """Image side 4x the test size: 16x the tokens. The logit of head h between tokens i, j is bounded by
    |q_i . k_j| * scale <= s(Wq_h) s(Wk_h) |x_i| |x_j| / sqrt(d) (s = largest singular value), which does
    not grow with the token count; q and k themselves (fp16) are bounded by s(W) max|x|. Check the bounds
    on the actual inputs, and that the fp16 model is finite and close to float32."""
    model = fine_tuned_tcnn()
    x = torch.randn(1, 3, 4 * TEST_SIZE, 4 * TEST_SIZE)
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda m, a, name=name: inputs.__setitem__(name, a[0].float()))
             for name, layer in attention_layers(model)]
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cpu', dtype=torch.float16):
            out = model(x)
    for h in hooks:
        h.remove()
    assert torch.isfinite(out).all()
    assert relative_error(out.float(), ref) <= 2e-2
    for name, layer in attention_layers(model):
        norm = inputs[name].flatten(2).norm(dim=1).max()  # largest token norm
        s_q, s_k = (torch.linalg.matrix_norm(w, ord=2) for w in layer.query_key_weights())
        assert (max(s_q.max(), s_k.max()) * norm) < FP16_MAX / 100, name  # q, k far inside the fp16 range
        bound = (s_q * s_k).max() * norm ** 2 * layer.scale
        logits = content_logits(layer, inputs[name])
        assert logits.abs().max() <= bound * (1 + 1e-4), name  # the bound holds
