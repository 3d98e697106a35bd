""" T-CNN encoders in segmentation_models_pytorch (`tu-tcnn_<name>`): every decoder builds, runs forward and
backward with the converted layers in place, and a DeepLabV3 trains a step on CPU. """
import pytest
import torch

import timm_tcnn  # noqa: F401  registers the models
from timm_tcnn import GatedPositionalAttention2d

smp = pytest.importorskip('segmentation_models_pytorch')


@pytest.mark.parametrize('decoder,output_stride', [('Unet', 32), ('FPN', 32), ('DeepLabV3', 8), ('DeepLabV3Plus', 16)])
def test_decoder_with_tcnn_encoder(decoder, output_stride):
    model = getattr(smp, decoder)('tu-tcnn_resnet18', encoder_weights=None, classes=3)
    layers = [m for m in model.encoder.modules() if isinstance(m, GatedPositionalAttention2d)]
    assert layers and all(m.dilation == 1 for m in layers) == (output_stride == 32)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 3, 64, 64)
    out.square().mean().backward()
    assert all(m.weight.grad is not None and torch.isfinite(m.weight.grad).all() for m in layers)


def test_deeplabv3_trains_a_step():
    torch.manual_seed(0)
    model = smp.DeepLabV3('tu-tcnn_resnet18', encoder_weights=None, classes=2).train()
    x, target = torch.randn(4, 3, 64, 64), torch.randint(0, 2, (4, 64, 64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    attention = {n for n, m in model.named_modules() if isinstance(m, GatedPositionalAttention2d)}
    gates = [n for n, _ in model.named_parameters() if n.rsplit('.', 1)[0] in attention]
    assert losses[1] < losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert gates
    changed = [n for n in gates if not torch.equal(before[n], dict(model.named_parameters())[n])]
    assert changed


def test_deeplabv3_with_features_class_encoder():
    """MobileNetV3 takes output_stride only as its features class: the T-CNN's encoder is that class, dilated."""
    model = smp.DeepLabV3('tu-tcnn_mobilenetv3_large_100', encoder_weights=None, classes=3).eval()
    layers = [m for m in model.encoder.modules() if isinstance(m, GatedPositionalAttention2d)]
    assert layers and any(m.dilation > 1 for m in layers)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_unsupported_output_stride_is_the_cnns_error():
    with pytest.raises(AssertionError) as cnn:
        smp.encoders.get_encoder('tu-resnet18', output_stride=4)
    with pytest.raises(AssertionError) as tcnn:
        smp.encoders.get_encoder('tu-tcnn_resnet18', output_stride=4)
    assert str(tcnn.value) == str(cnn.value)
    assert tcnn.traceback[-1].path == cnn.traceback[-1].path  # raised in timm's ResNet, not by timm_tcnn
