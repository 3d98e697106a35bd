""" The positional attention's Triton kernels (`timm_tcnn.layers.positional_kernels`), run on CPU by Triton's
interpreter in a subprocess (`kernel_checks.py`), against the closed form they replace on the GPU; and the count of
operations a training step issues with them, the GPU's. """
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from timm_tcnn.layers import positional_kernels_enabled, set_positional_kernels

pytestmark = pytest.mark.skipif(importlib.util.find_spec('triton') is None, reason='Triton is not installed')

# at most, with the kernels (ResNet-50-RS stage 4, half the content gates closed): (a training step, forward +
# backward; an inference call), counted on CPU tensors along the paths a layer takes on CUDA, in float32 (NCHW) and
# under bf16 autocast (channels-last); on CUDA the forward pass issues CUDA_SAVES fewer (test_op_count.py), so a
# training step there issues 34-37 in float32 and 36-39 in bf16
LIMITS = {
    '7x7': {'float32': (37, 15), 'bf16_channels_last': (39, 19)},
    '14x14 -> 7x7': {'float32': (40, 16), 'bf16_channels_last': (42, 20)},
}
CUDA_SAVES = 3


@pytest.fixture(scope='module')
def checks():
    tests = Path(__file__).parent
    env = dict(
        os.environ, TRITON_INTERPRET='1', PYTHONPATH=os.pathsep.join([str(tests), os.environ.get('PYTHONPATH', '')])
    )
    done = subprocess.run(
        [sys.executable, str(tests / 'kernel_checks.py')], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_kernels_equal_the_closed_form(checks):
    """P and the values' gradient (gates, locality, alpha, centre; gradient floor; content's gate gradient added or
    not), strides 1 and 2, 'same' padding, 5x5 kernels, a one-row map."""
    assert len(checks['builders']) == 4
    for result in checks['builders']:
        assert result['forward'] <= 1e-5, result
        assert result['backward'] <= 1e-4 and result['backward_without_content'] <= 1e-4, result


def test_layer_with_kernels_equals_reference_and_closed_form(checks):
    for result in checks['layers']:
        assert result['kernel_launches'] == 1, result
        assert result['forward'] <= 1e-5 and result['forward_closed'] <= 1e-5, result
        assert result['gradients'] <= 1e-4, result


def test_kernels_that_differ_are_refused_with_a_warning(checks):
    assert checks['fallback']['warned']
    assert checks['fallback']['forward'] <= 1e-5


def test_training_step_operations_with_kernels(checks):
    """The counts hold; a training step issues at most 40 operations on a GPU (the goal)."""
    for name, settings in LIMITS.items():
        for setting, (train_limit, inference_limit) in settings.items():
            forward, backward, inference = checks['operations'][name][setting]
            assert forward + backward <= train_limit and inference <= inference_limit, (name, setting)
            assert forward - CUDA_SAVES + backward <= 40, (name, setting)


def test_kernels_only_where_they_run():
    """Without the interpreter, CPU tensors take the closed form; the switch turns the kernels off everywhere."""
    if os.environ.get('TRITON_INTERPRET') != '1':
        assert not positional_kernels_enabled(torch.device('cpu'))
    assert positional_kernels_enabled(torch.device('cuda'))
    set_positional_kernels(False)
    try:
        assert not positional_kernels_enabled(torch.device('cuda'))
    finally:
        set_positional_kernels(True)
