""" `timm-tcnn bench --parts dense`: T-CNN vs CNN backbones (features_only, output_stride 8/16), the attention's
memory estimated before anything runs, and the refusal of a setting over the memory limit. """
import timm
import torch

import timm_tcnn  # noqa: F401
from timm_tcnn import attention_layers
from timm_tcnn.cli import main
from timm_tcnn.cli.commands import bench as bench_command
from timm_tcnn.tools.bench import dense_memory_estimate, dense_models, spread_state

TINY = ['bench', '--parts', 'dense', '--model', 'tcnn_resnet18', '--dense-size', '128', '--dense-batch-size', '1',
        '--reps', '1']


def test_dense_part_reports_every_state(tmp_path, capsys):
    out = tmp_path / 'dense.md'
    assert main(TINY + ['--output-strides', '8', '--out', str(out)]) == 0
    table = out.read_text()
    assert 'T-CNN state "fresh"' in table and 'T-CNN state "spread"' in table
    assert 'resnet18 as features_only backbones' in table and 'Peak RSS of this process' in table
    rows = [line.split(' | ') for line in table.splitlines() if line.startswith('| dense-')]
    parts = {(row[0].lstrip('| '), row[1]) for row in rows}
    assert parts == {(part, state) for part in ('dense-infer', 'dense-train', 'dense-infer-memory',
                                                 'dense-train-memory') for state in ('fresh', 'spread')}
    assert all(row[2] == 'OS 8, 128px, batch 1' and float(row[3]) > 0 for row in rows)
    memory = {(row[0].lstrip('| '), row[1]): float(row[3]) for row in rows if 'memory' in row[0]}
    assert memory['dense-train-memory', 'fresh'] > 1  # a training step keeps the attention, gates 0 or not
    assert memory['dense-infer-memory', 'spread'] > memory['dense-infer-memory', 'fresh']  # fresh runs the convs
    assert capsys.readouterr().out.strip().endswith(table.strip().splitlines()[-1])


def test_refused_over_the_memory_limit_before_any_work(capsys, monkeypatch):
    def measured(*args, **kwargs):
        raise AssertionError('measured despite the refusal')
    monkeypatch.setattr(bench_command, 'dense_models', measured)
    monkeypatch.setattr(bench_command, 'bench_models', measured)
    assert main(TINY + ['--parts', 'models', 'dense', '--memory-limit-gb', '0.001']) == 2
    err = capsys.readouterr().err
    assert err.startswith('timm-tcnn bench: error: ') and 'Traceback' not in err
    for fragment in ('output stride 16', 'GiB', 'over the limit of 0.00 GiB (--memory-limit-gb)', '--dense-batch-size',
                     '--memory-limit-gb', '--output-strides 16'):
        assert fragment in err
    assert main(TINY + ['--memory-limit-gb', '0']) == 2
    assert '--memory-limit-gb must be > 0' in capsys.readouterr().err


def test_memory_estimate_counts_the_attention_matrices():
    """What the estimate says inference keeps is what the layers keep: their plans' positional attention."""
    model = timm.create_model('tcnn_resnet18', features_only=True, output_stride=8)
    one, two = (dense_memory_estimate(model, 64, batch) for batch in (1, 2))
    spread_state(model)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    plans = [layer._plans.nbytes for _, layer in attention_layers(model)]
    assert one.layers == len(plans) and one.tokens == (64 // 8) ** 2  # stages 3 and 4 at output stride 8
    assert 0 <= sum(plans) - one.kept < 1024 * len(plans)  # the positional attention, and its keys and indices
    assert two.train - one.train == one.kept  # one softmax per sample and layer
    assert one.inference == two.inference  # the plans do not depend on the batch


def test_dense_models_share_the_cnn_weights():
    models, descriptions = dense_models('tcnn_resnet18', 16, ('fresh', 'uniform'))
    assert list(models) == ['cnn', 'fresh', 'uniform'] and 'uniform' in descriptions[1]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        cnn, fresh = models['cnn'](x), models['fresh'](x)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(cnn, fresh))
    shares = torch.cat([layer.content_share() for _, layer in attention_layers(models['uniform'])])
    assert ((shares > 0) & (shares < 1)).all()
