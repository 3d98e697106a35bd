""" Where things live: the packages depend one way (cli -> tools -> weights -> models -> layers), nothing imports the
command line, the old module paths still work (with a DeprecationWarning), and the wheel ships its data files. """
import ast
import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import timm_tcnn

PACKAGE = Path(timm_tcnn.__file__).parent
# a package may import only from itself, from packages to its right, and from the neutral modules
ORDER = ('layers', 'models', 'weights', 'tools', 'cli')
NEUTRAL = ('errors', 'version', 'utils')
# deprecated module paths -> where they moved
ALIASES = {
    'attention': 'layers', 'convert': 'models.convert', 'options': 'models.options', 'variants': 'models.variants',
    'published': 'models.published', 'analysis': 'tools.analysis', 'bench': 'tools.bench',
    'op_count': 'tools.op_count', 'runner': 'tools.runner',
}
# entry points above every package: `python -m timm_tcnn`, and the package's public API
ENTRY_POINTS = ('__main__', '__init__')


def _modules():
    for path in sorted(PACKAGE.rglob('*.py')):
        parts = path.relative_to(PACKAGE).with_suffix('').parts
        yield path, parts


def _imports(path: Path, parts):
    """Absolute names (below timm_tcnn, as tuples) of the package modules a file imports, anywhere in it."""
    package = parts[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = base + tuple(node.module.split('.')) if node.module else base
            elif node.module and node.module.split('.')[0] == 'timm_tcnn':
                target = tuple(node.module.split('.')[1:])
            else:
                continue
            yield target if target else (node.names[0].name,)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split('.')[0] == 'timm_tcnn':
                    yield tuple(alias.name.split('.')[1:]) or ('__init__',)


def test_packages_depend_one_way_and_nothing_imports_the_cli():
    bad = []
    checked = 0
    for path, parts in _modules():
        owner = parts[0]
        for target in _imports(path, parts):
            checked += 1
            head = target[0]
            where = f'{"/".join(parts)}.py imports timm_tcnn.{".".join(target)}'
            if owner in ENTRY_POINTS and len(parts) == 1:
                continue
            if head == 'cli' and owner != 'cli':
                bad.append(f'{where}: only the command line imports the command line')
            elif owner in ALIASES and len(parts) == 1:
                if '.'.join(target) != ALIASES[owner] and target != tuple(ALIASES[owner].split('.')[:1]):
                    bad.append(f'{where}: a deprecated alias imports only where its module moved')
            elif owner in NEUTRAL:
                if head not in NEUTRAL:
                    bad.append(f'{where}: neutral modules import only neutral modules')
            elif head in ORDER and ORDER.index(head) > ORDER.index(owner):
                bad.append(f'{where}: {owner} may not depend on {head} ({" -> ".join(reversed(ORDER))})')
            elif head not in ORDER + NEUTRAL:
                bad.append(f'{where}: not a package of the layout')
    assert checked > 100  # the walk found the imports (relative, absolute and inside functions)
    assert not bad, '\n'.join(bad)


def test_every_module_has_a_place():
    places = set(ORDER) | set(NEUTRAL) | set(ALIASES) | set(ENTRY_POINTS)
    assert {parts[0] for _, parts in _modules()} <= places


@pytest.mark.parametrize('old', sorted(set(ALIASES) - {'attention'}))
def test_deprecated_paths_are_the_moved_modules(old):
    sys.modules.pop(f'timm_tcnn.{old}', None)
    with pytest.warns(DeprecationWarning, match=f'timm_tcnn.{old}` moved to `timm_tcnn.{ALIASES[old]}'):
        module = importlib.import_module(f'timm_tcnn.{old}')
    assert module is importlib.import_module(f'timm_tcnn.{ALIASES[old]}')


def test_importing_the_package_does_not_import_the_command_line():
    code = 'import sys, timm_tcnn; assert not [m for m in sys.modules if m.startswith("timm_tcnn.cli")]'
    subprocess.run([sys.executable, '-c', code], check=True)


def test_one_list_of_attention_parameters():
    from timm_tcnn import conv_to_attention
    from timm_tcnn.layers import RATE_SCALED_PARAMS
    from timm_tcnn.models import ATTENTION_PARAMS
    layer = conv_to_attention(torch.nn.Conv2d(4, 4, 3, padding=1))
    assert set(layer.state_dict()) - {'weight', 'bias'} == set(ATTENTION_PARAMS)
    assert set(RATE_SCALED_PARAMS) < set(ATTENTION_PARAMS)


def test_default_recipe_is_package_data():
    from timm_tcnn.tools.experiment.recipes import DEFAULT_RECIPE, recipe_names, recipe_path
    assert DEFAULT_RECIPE in recipe_names() and recipe_path().is_file()
    assert recipe_path().is_relative_to(PACKAGE)


def test_wheel_ships_the_data_files(tmp_path):
    root = PACKAGE.parent
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', str(root),
                    '-w', str(tmp_path)], check=True, capture_output=True, timeout=600)
    wheel, = tmp_path.glob('timm_tcnn-*.whl')
    names = set(zipfile.ZipFile(wheel).namelist())
    from timm_tcnn.tools.experiment.recipes import recipe_names
    assert {f'timm_tcnn/tools/experiment/recipes/{name}' for name in recipe_names()} <= names
    assert 'timm_tcnn/models/published_weights.json' in names
    assert 'timm_tcnn/cli/commands/common.py' in names


def test_every_command_spells_options_one_way():
    from timm_tcnn.cli import build_parser
    commands = build_parser()._subparsers._group_actions[0].choices
    devices = set()
    for name, parser in commands.items():
        flags = {flag: action for action in parser._actions for flag in action.option_strings}
        assert '--output' not in parser.format_help(), name  # outputs are --out everywhere
        if '--device' in flags:
            devices.add(flags['--device'].default)
        for flag in ('--model-kwargs', '--compare-model-kwargs', '--tcnn-kwargs'):
            if flag in flags:
                assert flags[flag].nargs == '*' and flags[flag].default == {}, (name, flag)
    assert len(devices) == 1  # one default device (cuda if available, else cpu)
    robustness = commands['robustness']
    assert robustness.parse_args(['m', '--output', 'old']).out == 'old'  # the former spelling, hidden
    assert robustness.parse_args(['m', '--out', 'new']).out == 'new'
