""" The positional kernels compiled ahead of time for real GPUs (`timm_tcnn.tools.kernel_report`): every distinct
launch configuration of the registered variants' converted layers, for sm_80 and sm_90 (and sm_100 where the
bundled ptxas knows it), with no register spills, at most 255 registers per thread and shared memory within each
target's per-block limit. No GPU is needed: Triton compiles for a named target and its bundled ptxas assembles.

The default run compiles the variants' layers at output stride 32 for sm_90; the full matrix (output strides 32, 16
and 8, every target) is marked slow. """
import importlib.util

import pytest

from timm_tcnn.tools import kernel_report as kr


def _why_not() -> str:
    if importlib.util.find_spec('triton') is None:
        return 'Triton is not installed'
    missing = [t for t in (80, 90) if kr.ptxas_path(t) is None]
    return f'no bundled ptxas for sm_{missing[0]} in the Triton installation' if missing else ''


pytestmark = pytest.mark.skipif(bool(_why_not()), reason=_why_not() or 'unused')


def _check(rows, skipped, targets):
    assert rows, 'nothing compiled'
    assert 80 not in skipped and 90 not in skipped, skipped  # these must compile; sm_100 only where ptxas knows it
    assert {r.target for r in rows} == set(targets) - set(skipped)
    bad = [r for r in rows if not r.ok]
    assert not bad, kr.format_rows(bad)
    for r in rows:
        assert r.spill_stores == 0 and r.spill_loads == 0, r
        assert 0 < r.registers <= kr.MAX_REGISTERS, r
        assert 0 <= r.shared_bytes <= r.shared_limit == kr.SHARED_LIMITS[r.target], r
    kernels = {r.kernel for r in rows}
    assert kernels == {'forward_kernel', 'sums_kernel', 'values_grad_kernel'}, kernels
    assert {'HAS_CONTENT=0', 'HAS_CONTENT=1'} <= {r.config.split()[0] for r in rows if r.kernel == 'values_grad_kernel'}


def test_limits_are_the_targets():
    assert kr.SHARED_LIMITS[80] == 166912 and kr.SHARED_LIMITS[90] == kr.SHARED_LIMITS[100] == 232448


def test_configurations_are_the_jits():
    """Launches Triton specialises differently (here a map side divisible by 16) compile separately; launches it
    specialises alike (two map sizes with the same blocks) once."""
    from timm_tcnn.layers.positional_kernels import KernelPositional

    shapes = [KernelPositional(3, 1, size, size, (0, 0)) for size in (9, 11, 16)]
    configs = kr.launch_configs(shapes, 90)
    forward = [c for key, c in configs.items() if key[0] == '_forward_kernel']
    assert sorted(len(c.geometries) for c in forward) == [1, 2]
    assert any('height' in c.specialised for c in forward)


def test_variant_kernels_compile_for_sm90():
    geometries = kr.variant_geometries((32,))
    assert {(g.kernel_size, g.stride) for g in geometries} >= {(3, 1), (3, 2), (5, 1), (7, 1)}
    rows, skipped = kr.kernel_report(geometries, (90,))
    _check(rows, skipped, (90,))


@pytest.mark.slow
def test_variant_kernels_compile_for_every_target_and_output_stride():
    geometries = kr.variant_geometries()
    assert any(g.dilation == 4 for g in geometries) and any(g.dilation == 2 for g in geometries)
    rows, skipped = kr.kernel_report(geometries, kr.TARGETS)
    _check(rows, skipped, kr.TARGETS)
    assert set(skipped) <= {100}
    print('\n' + kr.format_summary(rows, skipped))
