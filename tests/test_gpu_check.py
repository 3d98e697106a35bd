""" examples/gpu_check.py, the GPU measurements in one run, works on CPU (small sizes): every part writes its
JSON, the SDPA part reports each backend (on CPU only the math one runs), nothing fails. """
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / 'examples' / 'gpu_check.py'


def run_check(tmp_path, *skip: str) -> dict:
    out = tmp_path / 'gpu_check.json'
    cmd = [sys.executable, str(SCRIPT), '--device', 'cpu', '--quick', '--out', str(out)]
    if skip:
        cmd += ['--skip', *skip]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_gpu_check_on_cpu(tmp_path):
    report = run_check(tmp_path, 'models', 'compiled')
    assert report['errors'] == {}
    assert report['machine']['device'].startswith('cpu')
    ops = report['operations']['resnet50rs stage 4, 7x7']
    assert 0 < ops['train_forward'] + ops['train_backward'] <= 80 and 0 < ops['inference'] <= 20
    backends = {(row['shape'], row['backend']): row for row in report['sdpa']}
    assert {backend for _, backend in backends} == {'FLASH_ATTENTION', 'EFFICIENT_ATTENTION', 'CUDNN_ATTENTION', 'MATH'}
    for (shape, backend), row in backends.items():
        assert row['runs'] == (backend == 'MATH') and (row['runs'] or row['error'])
    for path in ('explicit', 'explicit-closed-form'):
        assert {row['part'] for row in report['shapes'][path]} == {'shape-infer', 'shape-train'}
        assert all(row['ratio'] > 0 for row in report['shapes'][path])


@pytest.mark.slow
def test_gpu_check_models_and_compiled_on_cpu(tmp_path):
    report = run_check(tmp_path)
    assert report['errors'] == {}
    for path in ('explicit',):
        parts = {row['part'] for row in report['models'][path]}
        assert parts == {'infer', 'train', 'train-memory'}
    assert report['compiled']['ratio'] > 0
