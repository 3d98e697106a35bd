""" Where things live: the packages depend one way (cli -> tools -> weights -> models -> layers), nothing imports the
command line, no two modules import each other (directly or around a loop, at module level or inside functions), and
the wheel ships its data files. """
import ast
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import torch

import timm_tcnn

PACKAGE = Path(timm_tcnn.__file__).parent
# a package may import only from itself, from packages to its right, and from the neutral modules
ORDER = ('layers', 'models', 'weights', 'tools', 'cli')
NEUTRAL = ('errors', 'version', 'utils')
# entry points above every package: `python -m timm_tcnn`, and the package's public API
ENTRY_POINTS = ('__main__', '__init__')

Module = Tuple[str, ...]  # a module below the package root: ('tools', 'experiment', 'report'); a package's __init__
# is the package itself (('tools', 'experiment')), the root's own __init__ is ()


def _modules(root: Path = PACKAGE) -> Dict[Module, Path]:
    """Every module below `root`, by its name."""
    modules = {}
    for path in sorted(root.rglob('*.py')):
        parts = path.relative_to(root).with_suffix('').parts
        modules[parts[:-1] if parts[-1] == '__init__' else parts] = path
    return modules


def _imports(module: Module, path: Path, modules: Dict[Module, Path], root_name: str) -> Iterator[Module]:
    """The modules below the root that `module` (at `path`) imports, anywhere in it (at module level and inside
    functions): relative imports, absolute ones under `root_name`, and `from PACKAGE import submodule`."""
    package = module if path.name == '__init__.py' else module[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = base + tuple(node.module.split('.')) if node.module else base
            elif node.module and node.module.split('.')[0] == root_name:
                target = tuple(node.module.split('.')[1:])
            else:
                continue
            for alias in node.names:
                yield target + (alias.name,) if target + (alias.name,) in modules else target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split('.')[0] == root_name:
                    yield tuple(alias.name.split('.')[1:])


def _graph(root: Path) -> Dict[Module, Set[Module]]:
    modules = _modules(root)
    return {module: {t for t in _imports(module, path, modules, root.name) if t != module and t in modules}
            for module, path in modules.items()}


def import_cycles(root: Path) -> List[List[str]]:
    """The import cycles between the modules of the package at `root`: each strongly connected set of two or more
    modules of the import graph (Tarjan's algorithm), as sorted dotted names."""
    graph = _graph(root)
    index: Dict[Module, int] = {}
    low: Dict[Module, int] = {}
    stack: List[Module] = []
    cycles = []

    def visit(node: Module) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            members = []
            while not members or members[-1] != node:
                members.append(stack.pop())
            if len(members) > 1:
                cycles.append(sorted('.'.join((root.name, *m)) for m in members))

    for node in graph:
        if node not in index:
            visit(node)
    return cycles


def test_packages_depend_one_way_and_nothing_imports_the_cli():
    bad = []
    checked = 0
    modules = _modules()
    for module, path in modules.items():
        parts = path.relative_to(PACKAGE).with_suffix('').parts
        owner = parts[0]
        if owner in ENTRY_POINTS and len(parts) == 1:
            continue
        for target in _imports(module, path, modules, 'timm_tcnn'):
            checked += 1
            head = target[0] if target else '__init__'
            where = f'{"/".join(parts)}.py imports timm_tcnn.{".".join(target)}'
            if head == 'cli' and owner != 'cli':
                bad.append(f'{where}: only the command line imports the command line')
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
    places = set(ORDER) | set(NEUTRAL) | set(ENTRY_POINTS)
    assert {path.relative_to(PACKAGE).parts[0].removesuffix('.py') for path in _modules().values()} <= places


def test_no_import_cycle_between_modules():
    assert sum(len(targets) for targets in _graph(PACKAGE).values()) > 100  # the graph holds the package's imports
    assert not import_cycles(PACKAGE), import_cycles(PACKAGE)


def _write_package(root: Path, files: Dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding='utf-8')
    return root


def test_the_cycle_check_finds_cycles_through_functions_packages_and_absolute_imports(tmp_path):
    """A planted cycle is found whatever its shape; the same package without it has none."""
    acyclic = {
        '__init__.py': 'from .top import run\n',
        'top.py': 'from .sub import f\n\n\ndef run():\n    from . import helpers\n',
        'sub/__init__.py': 'from .low import f\n',
        'sub/low.py': 'from ..helpers import os\n\n\ndef f():\n    pass\n',
        'helpers.py': 'import os\n',
    }
    assert import_cycles(_write_package(tmp_path / 'acyclic' / 'pkg', acyclic)) == []
    planted = {
        'function_level': {'helpers.py': 'import os\n\n\ndef g():\n    from .top import run\n'},
        'module_level': {'sub/low.py': 'from ..top import run\n'},
        'absolute': {'helpers.py': 'import pkg.top\n'},
        'submodule_of_a_package': {'helpers.py': 'from pkg import top\n'},
    }
    for kind, change in planted.items():
        cycles = import_cycles(_write_package(tmp_path / kind / 'pkg', {**acyclic, **change}))
        assert cycles == [['pkg.helpers', 'pkg.sub', 'pkg.sub.low', 'pkg.top']] or (
            kind == 'module_level' and cycles == [['pkg.sub', 'pkg.sub.low', 'pkg.top']]), (kind, cycles)


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
        assert '--output' not in flags, name  # outputs are --out everywhere, with no other spelling
        if '--device' in flags:
            devices.add(flags['--device'].default)
        for flag in ('--model-kwargs', '--compare-model-kwargs', '--tcnn-kwargs'):
            if flag in flags:
                assert flags[flag].nargs == '*' and flags[flag].default == {}, (name, flag)
    assert len(devices) == 1  # one default device (cuda if available, else cpu)
