""" Attention diagnostics (timm_tcnn.tools.analysis), figures and `timm-tcnn analyze`, against independent
computations. """
import copy
import csv
import itertools
import json
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from timm.layers import Conv2dSame

import timm_tcnn  # noqa: F401  registers the models
from timm_tcnn import GatedPositionalAttention2d, attention_layers, conv_to_attention
from timm_tcnn.cli import main
from timm_tcnn.tools.analysis import AttentionAnalyzer, attention_maps, positional_offset_attention, query_positions
from helpers import randomize_batchnorm, relative_error


def tap_fraction_in_image(height: int, width: int, stride: int, tap) -> float:
    """Share of the queries (stride * i, stride * j) whose tap offset lands inside the H x W grid."""
    rows = range(0, height, stride)
    cols = range(0, width, stride)
    inside = sum(0 <= i + tap[0] < height and 0 <= j + tap[1] < width for i in rows for j in cols)
    return inside / (len(rows) * len(cols))


def open_gates(layer: GatedPositionalAttention2d, generator: torch.Generator) -> GatedPositionalAttention2d:
    with torch.no_grad():
        layer.set_attention_values(content_gate=torch.rand(layer.num_heads, generator=generator) * 0.8 + 0.1)
        layer.set_attention_values(locality_gate=torch.rand(layer.num_heads, generator=generator) * 0.8 + 0.1)
        layer.set_attention_values(pos_log_alpha=torch.rand(layer.num_heads, generator=generator) * 2 - 1.5)
        shift = torch.randn(layer.num_heads, 2, generator=generator) * 0.5
        layer.set_attention_values(pos_center=layer.attention_values()['pos_center'] + shift)
        layer.qk.weight.view(layer.num_heads, 2, -1)[:, 0].normal_(std=0.3, generator=generator)
    return layer


# ---------------------------------------------------------------- dense maps vs the layer itself

@pytest.mark.parametrize('kernel_size,stride', [(3, 1), (3, 2), (5, 2)])
def test_dense_mixed_attention_reproduces_layer_output(kernel_size, stride):
    generator = torch.Generator().manual_seed(kernel_size + stride)
    layer = open_gates(GatedPositionalAttention2d(6, 5, kernel_size, stride=stride), generator)
    taps = layer.tap_offsets() + layer.padding
    tap_weights = layer.weight[:, :, taps[:, 0], taps[:, 1]]  # C_out, C_in, heads
    for height, width in [(1, 1), (2, 3), (5, 4), (6, 7)]:
        x = torch.randn(2, 6, height, width, generator=generator)
        maps = attention_maps(layer, x)
        read = torch.einsum('bcn,bhqn->bhcq', x.flatten(2), maps.mixed)  # x A_h^T over in-image keys
        out = torch.einsum('och,bhcq->boq', tap_weights, read) + layer.bias[:, None]
        with torch.no_grad():
            ref = layer(x).flatten(2)
        assert relative_error(out, ref) <= 1e-5, (height, width)


@pytest.mark.parametrize('stride,height,width', [(1, 4, 5), (2, 4, 5), (2, 6, 3), (1, 1, 2)])
def test_positional_offsets_follow_gaussian_definition(stride, height, width):
    """With the locality gate at 1 the offset distribution is the 2D softmax of -alpha |r - c|^2 over
    the offsets |dy| < H, |dx| < W (zero tokens included), zero beyond; the one-hot part sits at the tap."""
    layer = open_gates(GatedPositionalAttention2d(3, 3, 3, stride=stride), torch.Generator().manual_seed(5))
    with torch.no_grad():
        layer.set_attention_values(locality_gate=1.)
    offsets = positional_offset_attention(layer, height, width)
    r_y, r_x = max(height - 1, 1), max(width - 1, 1)
    assert offsets.shape == (9, 2 * r_y + 1, 2 * r_x + 1)
    values = layer.attention_values()
    alpha = values['pos_log_alpha'].exp()
    for h in range(9):
        ref = torch.zeros(2 * r_y + 1, 2 * r_x + 1)
        dy = torch.arange(-(height - 1), height, dtype=torch.float32)[:, None]
        dx = torch.arange(-(width - 1), width, dtype=torch.float32)[None, :]
        cy, cx = values['pos_center'][h]
        logits = -alpha[h] * ((dy - cy) ** 2 + (dx - cx) ** 2)
        ref[r_y - height + 1:r_y + height, r_x - width + 1:r_x + width] = logits.flatten().softmax(0).view_as(logits)
        assert torch.allclose(offsets[h], ref, atol=1e-6), h
    with torch.no_grad():
        layer.set_attention_values(locality_gate=0.)
    onehot = positional_offset_attention(layer, height, width)
    for h, (ty, tx) in enumerate(layer.tap_offsets().tolist()):
        assert onehot[h, r_y + ty, r_x + tx] == 1 and onehot[h].sum() == 1


# ---------------------------------------------------------------- numbers at conversion, by hand

def test_borders_read_zero_tokens_at_the_tap_distance():
    """Dense maps: interior queries put all their mass on the tap pixel, border queries whose tap falls
    outside put none in the image (they read a zero token); the reported distance is |D_h| for both."""
    layer = conv_to_attention(nn.Conv2d(4, 4, 3, padding=1))
    H, W = 5, 4
    x = torch.randn(3, 4, H, W)
    maps = attention_maps(layer, x)
    queries = query_positions(layer, H, W)
    keys = torch.tensor([(i, j) for i in range(H) for j in range(W)], dtype=torch.float32)
    dist = torch.cdist(queries.float(), keys)
    for h, tap in enumerate(layer.tap_offsets().tolist()):
        for q, (qy, qx) in enumerate(queries.tolist()):
            inside = 0 <= qy + tap[0] < H and 0 <= qx + tap[1] < W
            row = maps.mixed[:, h, q]
            assert torch.allclose(row.sum(-1), torch.full((3,), float(inside)))
            if inside:
                assert torch.allclose((row * dist[q]).sum(-1), torch.full((3,), math.hypot(*tap)))
    analyzer = AttentionAnalyzer(nn.Sequential(layer))
    analyzer.update(x)
    (stats,) = analyzer.stats()
    for head in stats.heads:
        assert head.distance_positional == pytest.approx(math.hypot(*head.tap), abs=1e-6)
        assert head.distance_mixed == pytest.approx(math.hypot(*head.tap), abs=1e-6)
        assert head.in_image_positional == pytest.approx(tap_fraction_in_image(H, W, 1, head.tap), abs=1e-6)
        assert head.entropy_positional == pytest.approx(0., abs=1e-6)


def test_uniform_content_attention_by_hand():
    """Q = 0 makes the content attention uniform over in-image keys: content distance is the mean key
    distance, entropy log N; with gate g the mixed row is (1 - g) one-hot(tap, maybe a zero token) + g / N."""
    layer = conv_to_attention(nn.Conv2d(3, 3, 3, stride=2, padding=1))
    g = 0.25
    with torch.no_grad():
        layer.query_key_weights()[0].zero_()
        layer.set_attention_values(content_gate=g)
    H, W = 5, 6
    analyzer = AttentionAnalyzer(nn.Sequential(layer))
    analyzer.update(torch.randn(2, 3, H, W))
    (stats,) = analyzer.stats()
    N = H * W
    keys = list(itertools.product(range(H), range(W)))
    queries = list(itertools.product(range(0, H, 2), range(0, W, 2)))
    mean_key_distance = sum(math.dist(q, k) for q in queries for k in keys) / (len(queries) * N)
    assert stats.is_convolution is False and stats.identity_error is None
    for head in stats.heads:
        assert head.content_share == g
        assert head.distance_content == pytest.approx(mean_key_distance, rel=1e-5)
        assert head.entropy_content == pytest.approx(math.log(N), rel=1e-5)
        tap_distance = math.hypot(*head.tap)
        assert head.distance_mixed == pytest.approx((1 - g) * tap_distance + g * mean_key_distance, rel=1e-5)
        entropy, in_image = 0., 0.
        for qy, qx in queries:
            inside = 0 <= qy + head.tap[0] < H and 0 <= qx + head.tap[1] < W
            tap_mass = (1 - g) + g / N if inside else 1 - g
            entropy += -tap_mass * math.log(tap_mass) - (N - inside) * (g / N) * math.log(g / N)
            in_image += g + (1 - g) * inside
        assert head.entropy_mixed == pytest.approx(entropy / len(queries), rel=1e-5)
        assert head.in_image_mixed == pytest.approx(in_image / len(queries), rel=1e-5)


def test_statistics_do_not_depend_on_query_blocks(monkeypatch):
    import timm_tcnn.tools.analysis as analysis
    layer = open_gates(GatedPositionalAttention2d(4, 4, 3, stride=2), torch.Generator().manual_seed(7))
    x = torch.randn(3, 4, 6, 5)
    results = []
    for block in (analysis._BLOCK_ELEMENTS, 1):  # all queries at once, one query per block
        monkeypatch.setattr(analysis, '_BLOCK_ELEMENTS', block)
        analyzer = AttentionAnalyzer(nn.Sequential(layer))
        analyzer.update(x[:2])
        analyzer.update(x[2:])
        results.append(analyzer.stats()[0])
    assert results[0].images == results[1].images == 3
    for whole, split in zip(results[0].heads, results[1].heads):
        for key, value in vars(whole).items():
            assert getattr(split, key) == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_weight_drift_and_identity_error_against_cnn():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    model = nn.Sequential(conv_to_attention(conv))
    x = torch.randn(2, 4, 7, 6)
    same = {'0.weight': conv.weight.detach(), '0.bias': conv.bias.detach()}
    analyzer = AttentionAnalyzer(model, same)
    analyzer.update(x)
    (stats,) = analyzer.stats()
    assert stats.weight_drift == 0 and stats.identity_reference == 'cnn'
    assert stats.identity_error <= 1e-6
    scaled = {'0.weight': conv.weight.detach() * 1.25, '0.bias': conv.bias.detach()}
    analyzer = AttentionAnalyzer(model, scaled)
    analyzer.update(x)
    (stats,) = analyzer.stats()
    assert stats.weight_drift == pytest.approx(0.25 / 1.25, rel=1e-6)
    ref = F.conv2d(x, scaled['0.weight'], conv.bias, 2, 1)
    assert stats.identity_error == pytest.approx(relative_error(conv(x), ref), rel=1e-4)
    with pytest.raises(ValueError, match=r'no convolution 0.weight of shape \(6, 4, 3, 3\)'):
        AttentionAnalyzer(model, {'0.weight': torch.zeros(6, 4, 1, 1), '0.bias': conv.bias})


def test_model_without_converted_layers_is_an_error():
    with pytest.raises(ValueError, match='no converted layers'):
        AttentionAnalyzer(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1)))


# ---------------------------------------------------------------- a T-CNN, fresh and fine-tuned

# tcnn_resnet50rs with one block per stage but two in stage 4 (a strided and a plain converted layer)
MODEL_KWARGS = dict(num_classes=10, layers=(1, 1, 1, 2))


@pytest.fixture(scope='module')
def fresh_and_tuned():
    """A T-CNN with random weights, and a copy whose converted layers took a few Adam steps on random targets."""
    torch.manual_seed(0)
    # gates learn at the weights' rate here, so that 3 large steps leave them strictly between 0 and 1
    fresh = randomize_batchnorm(timm.create_model('tcnn_resnet50rs', tcnn_gate_lr_scale=1., **MODEL_KWARGS),
                                torch.Generator().manual_seed(0))
    tuned = copy.deepcopy(fresh).train().requires_grad_(False)
    for _, layer in attention_layers(tuned):
        layer.requires_grad_(True)
    optimizer = torch.optim.Adam([p for p in tuned.parameters() if p.requires_grad], lr=0.02)
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    for _ in range(3):
        loss = F.cross_entropy(tuned(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return fresh.eval(), tuned.eval()


@pytest.fixture(scope='module')
def fresh_and_tuned_stats(fresh_and_tuned):
    images = torch.randn(2, 3, 96, 64)
    cnn = fresh_and_tuned[0].state_dict()
    result = []
    for model in fresh_and_tuned:
        analyzer = AttentionAnalyzer(model, cnn)
        analyzer.update(images)
        result.append(analyzer.stats())
    return result


def test_conversion_state_of_tcnn(fresh_and_tuned, fresh_and_tuned_stats):
    fresh_stats, _ = fresh_and_tuned_stats
    assert [s.name for s in fresh_stats] == [name for name, _ in attention_layers(fresh_and_tuned[0])]
    for layer in fresh_stats:
        (height, width), = layer.input_sizes
        assert layer.is_convolution and layer.weight_drift == 0 and layer.identity_error <= 1e-5
        for head in layer.heads:
            assert head.content_share == 0 and head.locality_share == 0
            assert head.distance_positional == pytest.approx(math.hypot(*head.tap), abs=1e-6)
            assert head.distance_mixed == pytest.approx(head.distance_positional, abs=1e-6)
            assert head.positional_center == pytest.approx(head.tap, abs=1e-6)
            assert head.entropy_mixed == pytest.approx(0, abs=1e-5)
            assert head.in_image_positional == pytest.approx(
                tap_fraction_in_image(height, width, layer.stride, head.tap), abs=1e-6)


def test_fine_tuning_moves_the_numbers(fresh_and_tuned, fresh_and_tuned_stats):
    fresh_stats, tuned_stats = fresh_and_tuned_stats
    layers = dict(attention_layers(fresh_and_tuned[1]))
    opened = 0
    for before, after in zip(fresh_stats, tuned_stats):
        layer = layers[after.name]
        assert after.weight_drift > 0
        assert [h.content_share for h in after.heads] == layer.content_share().tolist()
        assert after.identity_error is None and not after.is_convolution
        for h0, h1 in zip(before.heads, after.heads):
            g = h1.content_share
            pos, content = h1.distance_positional, h1.distance_content
            assert h1.distance_mixed == pytest.approx((1 - g) * pos + g * content, rel=1e-5)
            if g > 0:
                opened += 1
                # pulled from the positional distance towards the content one, and less peaked
                assert min(pos, content) < h1.distance_mixed < max(pos, content)
                assert h1.entropy_mixed > h0.entropy_mixed and h1.in_image_mixed > h1.in_image_positional - 1e-6
    assert opened > 0


def test_query_attention_at_conversion_marks_the_tap_pixel(fresh_and_tuned):
    model = fresh_and_tuned[0]
    layers = dict(attention_layers(model))
    analyzer = AttentionAnalyzer(model)
    maps = analyzer.query_attention(torch.randn(3, 96, 64), (50, 30))
    assert [m.name for m in maps] == list(layers)
    for m in maps:
        H, W = m.grid_size
        qy, qx = m.query
        stride = layers[m.name].stride
        # the query of the layer's (strided) grid nearest to the pixel's cell
        assert qy % stride == 0 and abs(qy - 50 * H // 96) <= stride / 2 and qy < H
        assert qx % stride == 0 and abs(qx - 30 * W // 64) <= stride / 2 and qx < W
        for h, (ty, tx) in enumerate(m.taps.tolist()):
            ref = torch.zeros(H, W)
            if 0 <= qy + ty < H and 0 <= qx + tx < W:
                ref[qy + ty, qx + tx] = 1
            assert torch.equal(m.mixed[h], ref), (m.name, h)
    with pytest.raises(ValueError, match='outside'):
        analyzer.query_attention(torch.randn(3, 96, 64), (96, 0))


def test_figures_are_valid_pngs(fresh_and_tuned, fresh_and_tuned_stats, tmp_path):
    from timm_tcnn.tools import plots
    stats = fresh_and_tuned_stats[1]
    paths = [
        plots.plot_content_share(stats, tmp_path / 'share.png'),
        plots.plot_attention_distance(stats, tmp_path / 'distance.png'),
        plots.plot_query_attention(
            torch.rand(96, 64, 3).numpy(),
            AttentionAnalyzer(fresh_and_tuned[1]).query_attention(torch.randn(3, 96, 64), (40, 20)),
            (40, 20), tmp_path / 'query.png', max_heads=4),
    ]
    for path in paths:
        with Image.open(path) as image:
            image.verify()
            assert image.format == 'PNG' and min(image.size) > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ['distance.png', 'query.png', 'share.png']


# ---------------------------------------------------------------- the command line

@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    """Four images of different sizes and modes, one corrupt .jpg and a text file (ignored)."""
    folder = tmp_path_factory.mktemp('images')
    generator = torch.Generator().manual_seed(3)
    for i, (h, w) in enumerate([(80, 120), (64, 64), (100, 70), (50, 90)]):
        pixels = (torch.rand(h, w, 3, generator=generator) * 255).to(torch.uint8).numpy()
        image = Image.fromarray(pixels)
        (image.convert('L') if i == 1 else image).save(folder / f'img{i}.png')
    (folder / 'broken.jpg').write_bytes(b'not a jpeg')
    (folder / 'notes.txt').write_text('not an image')
    return folder


@pytest.fixture(scope='module')
def checkpoints(fresh_and_tuned, tmp_path_factory):
    folder = tmp_path_factory.mktemp('checkpoints')
    fresh, tuned = fresh_and_tuned
    cnn = {k: v for k, v in fresh.state_dict().items()
           if not k.endswith(('content_gate', 'locality_gate', 'pos_log_alpha', 'pos_center', 'qk.weight'))}
    save_file({k: v.contiguous() for k, v in cnn.items()}, str(folder / 'cnn.safetensors'))
    torch.save({'state_dict': tuned.state_dict(), 'epoch': 1}, folder / 'tuned.pth')
    return folder


def test_analyze_command_writes_report_and_figures(fresh_and_tuned, checkpoints, image_folder, tmp_path, capsys):
    out = tmp_path / 'report'
    code = main([
        'analyze', 'tcnn_resnet50rs', '--model-kwargs', 'num_classes=10', 'layers=(1, 1, 1, 2)',
        '--checkpoint', str(checkpoints / 'tuned.pth'), '--cnn', str(checkpoints / 'cnn.safetensors'),
        '--images', str(image_folder), '--out', str(out),
        '--img-size', '64', '--max-images', '3', '--batch-size', '2', '--query-pixel', '10', '40',
    ])
    assert code == 0
    assert 'skipped 1 unreadable' in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        'attention_distance.png', 'attention_stats.csv', 'attention_stats.json', 'content_share.png',
        'query_attention.png']
    for name in ('attention_distance.png', 'content_share.png', 'query_attention.png'):
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == 'PNG'
    report = json.loads((out / 'attention_stats.json').read_text())
    assert report['images'] == 3 and [p.rsplit('/', 1)[-1] for p in report['skipped_images']] == ['broken.jpg']
    assert report['input_size'] == [3, 64, 64] and report['query_pixel'] == [10, 40]
    fresh, tuned = fresh_and_tuned
    layers = dict(attention_layers(tuned))
    cnn = fresh.state_dict()
    assert [layer['name'] for layer in report['layers']] == list(layers)
    for entry in report['layers']:
        layer = layers[entry['name']]
        ref = cnn[entry['name'] + '.weight']
        assert entry['weight_drift'] == pytest.approx(((layer.weight - ref).norm() / ref.norm()).item(), rel=1e-4)
        # saved with gate_lr_scale 1, loaded into a model with the default scale: same values up to rounding
        assert [h['content_share'] for h in entry['heads']] == pytest.approx(layer.content_share().tolist(), rel=1e-6)
        assert entry['images'] == 3
    with open(out / 'attention_stats.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(entry['heads']) for entry in report['layers'])
    first = report['layers'][0]['heads'][4]
    assert float(rows[4]['distance_mixed']) == pytest.approx(first['distance_mixed'])
    assert float(rows[4]['entropy_content']) == pytest.approx(first['entropy_content'])


def test_analyze_pretrained_against_cnn_from_hub(offline_hub, image_folder, tmp_path):
    """--pretrained converts the CNN's weights, --cnn NAME loads that CNN: no drift, identity to float precision."""
    out = tmp_path / 'report'
    assert main([
        'analyze', 'tcnn_resnet50rs', '--pretrained', '--cnn', 'resnetrs50', '--images', str(image_folder),
        '--out', str(out), '--img-size', '64', '--max-images', '2', '--no-plots',
    ]) == 0
    report = json.loads((out / 'attention_stats.json').read_text())
    assert sorted(p.name for p in out.iterdir()) == ['attention_stats.csv', 'attention_stats.json']
    assert len(report['layers']) == 3
    for layer in report['layers']:
        assert layer['weight_drift'] == 0 and layer['identity_reference'] == 'cnn'
        assert layer['identity_error'] <= 1e-5


def test_analyze_command_bad_inputs(checkpoints, image_folder, tmp_path, capsys):
    def analyze(*args, images=image_folder, weights=('--random-weights',), plots=False):
        code = main(['analyze', *args, *weights, '--images', str(images), '--out', str(tmp_path / 'out'),
                     '--img-size', '64', *([] if plots else ['--no-plots'])])
        assert code == 2
        return capsys.readouterr().err

    empty = tmp_path / 'empty'
    empty.mkdir()
    (empty / 'readme.txt').write_text('no images here')
    assert 'holds no image file' in analyze('tcnn_resnet50rs', images=empty)
    unreadable = tmp_path / 'unreadable'
    unreadable.mkdir()
    (unreadable / 'a.png').write_bytes(b'\x89PNG broken')
    assert 'none of the 1 image files could be read' in analyze('tcnn_resnet50rs', images=unreadable)
    assert 'not a folder' in analyze('tcnn_resnet50rs', images=tmp_path / 'missing')
    assert 'no converted layers' in analyze('resnet18')
    mismatch = analyze('tcnn_resnet50rs', '--model-kwargs', 'num_classes=10', '--checkpoint',
                       str(checkpoints / 'tuned.pth'), weights=())
    assert 'does not fit tcnn_resnet50rs' in mismatch and 'pass the architecture kwargs it was trained with' in mismatch
    assert 'neither a file nor a timm model name' in analyze('tcnn_resnet50rs', '--cnn', 'no_such_cnn')
    assert 'outside the 64x64 model input' in analyze('tcnn_resnet50rs', '--query-pixel', '64', '3', plots=True)
    assert 'has no weights: pass one of --pretrained, --checkpoint FILE, --random-weights' in analyze(
        'tcnn_resnet50rs', weights=())
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('conv', [
    nn.Conv2d(6, 12, 5, stride=2, padding=2, groups=6),  # depthwise, channel multiplier 2
    Conv2dSame(4, 6, 3, stride=2, groups=2),  # TF 'SAME' padding: queries start at 1 on even sizes
])
def test_identity_error_of_grouped_and_same_layers(conv):
    model = nn.Sequential(conv_to_attention(conv))
    analyzer = AttentionAnalyzer(model, {'0.weight': conv.weight.detach(), '0.bias': conv.bias.detach()})
    analyzer.update(torch.randn(2, conv.in_channels, 8, 7))
    (stats,) = analyzer.stats()
    assert stats.identity_error <= 1e-6 and stats.weight_drift == 0
