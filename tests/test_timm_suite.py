""" timm's own model test suite (`tests/test_models.py` from timm's sdist) run on the tcnn_* models.

The suite is not installed with timm: its sdist on PyPI is downloaded once with pip (at the
installed timm version) into the pytest cache (or `$TIMM_TCNN_SDIST_DIR`), and the suite runs in a
subprocess with a generated conftest that imports `timm_tcnn` before the suite builds its
parameter lists from the registry. Without PyPI and without a cached sdist, the tests skip.
"""
import os
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import timm

import timm_tcnn

REPO_ROOT = Path(__file__).resolve().parents[1]

# every per-model test function of timm's suite that applies to a tcnn_* model
SUITE_FUNCTIONS = (
    'test_model_forward',
    'test_model_backward',
    'test_model_default_cfgs',
    'test_model_forward_torchscript',
    'test_model_forward_features',
    'test_model_forward_fx',
    'test_model_backward_fx',
    'test_model_forward_fx_torchscript',
)
# these load pretrained weights: they run where the offline Hub cache holds the CNN's weights
PRETRAINED_FUNCTIONS = ('test_model_load_pretrained', 'test_model_features_pretrained')

SUITE_CONFTEST = '''\
import timm_tcnn  # noqa: F401  registers tcnn_* before the suite builds its parameter lists from the registry
'''
SUITE_INI = '''\
[pytest]
filterwarnings =
    ignore::pytest.PytestUnknownMarkWarning
    ignore::DeprecationWarning
    ignore::FutureWarning
'''


def _sdist_cache(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    override = os.environ.get('TIMM_TCNN_SDIST_DIR')
    if override:
        path = Path(override)
        path.mkdir(parents=True, exist_ok=True)
        return path
    cache = getattr(config, 'cache', None)  # absent with -p no:cacheprovider
    return cache.mkdir('timm-sdist') if cache is not None else tmp_path_factory.mktemp('timm-sdist')


def _download_sdist(version: str, cache_dir: Path) -> Path:
    """timm's sdist at `version`, from `cache_dir` or downloaded there with pip (atomically)."""
    target = cache_dir / f'timm-{version}.tar.gz'
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir) as download_dir:
        cmd = [
            sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:',
            '--timeout', '15', '--retries', '1', '--disable-pip-version-check',
            f'timm=={version}', '-d', download_dir,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.skip(f'pip download of timm=={version} (sdist) timed out after 300 s: is PyPI reachable?')
        downloaded = Path(download_dir) / target.name
        if proc.returncode != 0 or not downloaded.exists():
            pytest.skip(
                f'cannot get timm\'s sdist timm=={version} from PyPI, so timm\'s own test suite cannot run '
                f'(pip exit code {proc.returncode}: {proc.stderr.strip()[-400:]}). Put {target.name} into '
                f'{cache_dir} (or set TIMM_TCNN_SDIST_DIR) to run it offline.')
        os.replace(downloaded, target)
    return target


@pytest.fixture(scope='session')
def timm_suite_dir(request, tmp_path_factory) -> Path:
    """A directory holding timm's `test_models.py` (installed timm version) and a conftest importing timm_tcnn."""
    sdist = _download_sdist(timm.__version__, _sdist_cache(request.config, tmp_path_factory))
    member = f'timm-{timm.__version__}/tests/test_models.py'
    with tarfile.open(sdist) as tar:
        try:
            source = tar.extractfile(member).read()
        except KeyError:
            pytest.fail(f'{sdist} has no {member}: timm moved its model test suite; update {Path(__file__).name}.')
    suite_dir = tmp_path_factory.mktemp('timm_suite')
    (suite_dir / 'test_models.py').write_bytes(source)
    (suite_dir / 'conftest.py').write_text(SUITE_CONFTEST)
    (suite_dir / 'pytest.ini').write_text(SUITE_INI)
    return suite_dir


def _run_suite(suite_dir: Path, keyword: str, tag: str) -> Tuple[subprocess.CompletedProcess, List[Dict[str, str]]]:
    """Run timm's suite on the tests selected by `keyword`; return the process and one record per test."""
    report = suite_dir / f'report-{tag}.xml'
    env = dict(os.environ)
    # GITHUB_ACTIONS makes the suite drop tests to save memory on GitHub's runners: run the full set everywhere
    env.pop('GITHUB_ACTIONS', None)
    env.pop('PYTEST_ADDOPTS', None)  # options meant for our run (e.g. -m "not slow") must not select the suite's tests
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get('PYTHONPATH')]))
    cmd = [
        sys.executable, '-m', 'pytest', 'test_models.py', '-k', keyword, '-p', 'no:cacheprovider',
        '-q', '-rfEs', '--durations=5', f'--junitxml={report}',
    ]
    proc = subprocess.run(cmd, cwd=suite_dir, env=env, capture_output=True, text=True, timeout=3600)
    records = []
    if report.exists():
        for case in ET.parse(report).getroot().iter('testcase'):
            outcome = 'passed'
            for child in case:
                if child.tag in ('failure', 'error', 'skipped'):
                    outcome = child.tag
            records.append(dict(name=case.get('name'), outcome=outcome))
    return proc, records


def _check_suite(suite_dir: Path, variant: str, functions: Tuple[str, ...], keyword: str) -> None:
    proc, records = _run_suite(suite_dir, keyword, variant)
    log = proc.stdout[-12000:] + proc.stderr[-4000:]  # the failures, the summary and the slowest tests
    assert proc.returncode == 0, f'timm\'s test suite failed on {variant} (exit code {proc.returncode}):\n{log}'
    not_passed = [r for r in records if r['outcome'] != 'passed']
    assert not not_passed, f'timm\'s test suite did not pass every test on {variant}: {not_passed}\n{log}'
    assert all(variant in r['name'] for r in records), f'tests of other models ran: {records}'
    ran = {r['name'].split('[')[0] for r in records}
    missing = [f for f in functions if f not in ran]
    assert not missing, f'timm\'s test suite ran no {missing} on {variant} (ran {sorted(ran)}):\n{log}'


@pytest.mark.parametrize('variant', ['tcnn_resnet50rs', 'tcnn_resnet101rs'])
def test_timm_suite(timm_suite_dir, offline_hub, variant):
    """Every test of timm's suite that applies to the model passes, incl. pretrained loading from the offline cache."""
    _check_suite(timm_suite_dir, variant, SUITE_FUNCTIONS + PRETRAINED_FUNCTIONS, variant)


@pytest.mark.slow
@pytest.mark.parametrize('variant', [
    'tcnn_resnet152rs', 'tcnn_resnet200rs', 'tcnn_resnet270rs', 'tcnn_resnet350rs', 'tcnn_resnet420rs',
])
def test_timm_suite_deep(timm_suite_dir, variant):
    """The deeper variants; pretrained loading (same code path for every variant) is left to the two above."""
    _check_suite(timm_suite_dir, variant, SUITE_FUNCTIONS, f'{variant} and not pretrained')


@pytest.mark.slow
@pytest.mark.parametrize('variant', sorted(
    set(timm_tcnn.VARIANTS) - {f'tcnn_resnet{d}rs' for d in (50, 101, 152, 200, 270, 350, 420)}))
def test_timm_suite_families(timm_suite_dir, variant):
    """The other families (ConvNeXt, EfficientNet, MobileNetV3, RegNet, CSPNet, ResNet/ResNeXt): the same tests."""
    _check_suite(timm_suite_dir, variant, SUITE_FUNCTIONS, f'{variant} and not pretrained')
