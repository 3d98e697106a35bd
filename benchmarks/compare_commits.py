""" Two trees of timm-tcnn side by side: T-CNN / CNN ratios of this tree and an earlier commit, in one run.

    python benchmarks/compare_commits.py 4be696b                      # the working tree against 4be696b
    python benchmarks/compare_commits.py 4be696b --current HEAD       # the last commit against 4be696b
    python benchmarks/compare_commits.py 4be696b --states spread open --sizes 448 --rounds 5

Each tree runs in its own Python process with PYTHONPATH at that tree (a commit is checked out with
`git worktree add --detach` into a temporary folder, removed afterwards); each process reports the
`timm_tcnn.__file__` it imported, which the run checks. Both processes build the same CNN (`--cnn`, random
weights from `--seed`) and convert it on load into the T-CNN (`--model`, `--stages`, strided convolutions
included), then put a copy in each benchmark state (`STATES`) with values written by this script only
(`set_attention_values`, which every tree has, and the Q/K weights written directly, `qk.weight` or the older
`q.weight` and `k.weight`), identical in both trees. Measurements alternate between the trees (A B, then B A,
...) over `--rounds` rounds, after one warm-up call each, on the same inputs:

- `infer`: the model's inference throughput, T-CNN / CNN (eval mode, no autograd), per image size;
- `layer-infer`, `layer-train`: one converted layer (stage 3's strided layer and a stride-1 layer, at their
  224 px shapes) against its convolution, inference and forward + backward; `efficiency` divides the time ratio
  by the FLOP ratio (CNN / T-CNN, `torch.utils.flop_counter`).

The table gives per tree the median ratio over rounds with its range, and `now / before`: the median of the
per-round quotients of the two trees' ratios, with their range.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]

# benchmark state -> what it sets, per converted layer
STATES = {
    'fresh': 'freshly converted: every gate 0 (the layer is its convolution)',
    'positional': 'content gates 0, locality gates in [0.05, 0.3], alpha spread over [0.25, 4], centres moved',
    'spread': 'half the content gates closed, the others and the locality gates in [0.05, 0.3], alpha spread over '
              '[0.25, 4], centres moved, content logits std 4 (timm_tcnn.tools.bench.spread_state)',
    'open': 'every content gate open in [0.05, 0.3], locality gates in [0.05, 0.3], alpha spread over [0.25, 4], '
            'centres moved, content logits std 4',
    'uniform': 'every gate 0.3, alpha 0.5, Q/K std 0.1 (timm_tcnn.tools.bench.fine_tune_like without its Adam '
               'steps)',
}
# layer name -> (stride, input size at 224 px) of the converted layer measured alone
LAYERS = {'stage 3, 28x28 -> 14x14': (2, 28), 'stage 3, 14x14': (1, 14)}
PARTS = ('infer', 'layer-infer', 'layer-train')


class CompareError(Exception):
    """Bad input or a tree that cannot run: printed as `error: ...`."""


# ---- benchmark states (run inside each tree's process; only APIs every tree has)

def _layer_state(layer, x, state: str, seed: int) -> None:
    """Put one converted layer in `state`, its content logits calibrated on its input x (B, C, H, W)."""
    import torch
    if state == 'fresh':
        return
    g = torch.Generator().manual_seed(seed)
    heads, d, channels = layer.num_heads, layer.qk_dim, layer.in_channels
    q = torch.randn(heads * d, channels, generator=g)
    k = torch.randn(heads * d, channels, generator=g)
    centre = layer.conversion_values()['pos_center'].cpu()
    if state == 'uniform':
        values = dict(content_gate=torch.full((heads,), 0.3), locality_gate=torch.full((heads,), 0.3),
                      pos_log_alpha=torch.full((heads,), math.log(0.5)), pos_center=centre)
        q, k = q * 0.1, k * 0.1
    else:
        alpha = torch.linspace(math.log(0.25), math.log(4.), heads).exp()
        alpha[heads // 2] = 1.
        content = torch.empty(heads).uniform_(0.05, 0.3, generator=g)
        closed = {'positional': heads, 'spread': heads // 2, 'open': 0}[state]
        content[torch.randperm(heads, generator=g)[:closed]] = -0.02  # stored below 0: clamped to 0
        values = dict(
            content_gate=content,
            locality_gate=torch.empty(heads).uniform_(0.05, 0.3, generator=g),
            pos_log_alpha=alpha[torch.randperm(heads, generator=g)].log(),
            pos_center=centre + torch.randn(heads, 2, generator=g) * 0.3,
        )
        tokens = x.flatten(2).transpose(1, 2)  # B, N, C
        qs = (tokens @ q.t()).unflatten(-1, (heads, d)).transpose(1, 2)  # B, h, N, d
        ks = (tokens @ k.t()).unflatten(-1, (heads, d)).transpose(1, 2)
        std = (qs @ ks.transpose(-2, -1) * d ** -0.5).std()
        q, k = q * (4. / std).sqrt(), k * (4. / std).sqrt()
    with torch.no_grad():
        layer.set_attention_values(**{name: v.to(layer.content_gate) for name, v in values.items()})
        if hasattr(layer, 'qk'):  # joint projection: per head its d query rows, then its d key rows
            layer.qk.weight.copy_(torch.stack([q.view(heads, d, -1), k.view(heads, d, -1)], 1).flatten(0, 2))
        else:
            layer.q.weight.copy_(q)
            layer.k.weight.copy_(k)


def set_model_state(model, state: str, seed: int = 0, img_size: int = 96) -> None:
    """Put every converted layer of `model` in benchmark `state` (`STATES`), in place, calibrated on the inputs the
    freshly converted model gives its layers on random images of `img_size` px."""
    import torch

    import timm_tcnn
    if state not in STATES:
        raise ValueError(f'unknown state {state!r}: choose from {list(STATES)}.')
    layers = [layer for _, layer in timm_tcnn.attention_layers(model)]
    inputs = {}

    def record(module, args) -> None:
        inputs.setdefault(module, args[0])
    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    try:
        with torch.no_grad():
            model.eval()(torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed)))
    finally:
        for hook in hooks:
            hook.remove()
    for index, layer in enumerate(layers):
        _layer_state(layer, inputs[layer], state, seed * 1000 + index)
    model.eval()


# ---- the worker: one tree's measurements, commands as JSON lines on stdin

class Worker:
    def __init__(self, config: Dict):
        import timm
        import torch

        import timm_tcnn
        torch.set_num_threads(config['threads'])
        self.config = config
        torch.manual_seed(config['seed'])
        self.cnn = timm.create_model(config['cnn'], pretrained=False).eval()
        weights = self.cnn.state_dict()
        self.models, self.layers = {}, {}
        for state in config['states']:
            tcnn = timm.create_model(config['model'], pretrained=False, tcnn_stages=tuple(config['stages']),
                                     tcnn_convert_strided=True)
            tcnn.load_state_dict(weights)  # CNN weights convert on load
            set_model_state(tcnn, state, config['seed'])
            self.models[state] = tcnn
            self.layers[state] = self._pick_layers(tcnn)
        self.inputs = {}
        self.warm = set()
        self.info = dict(file=timm_tcnn.__file__, torch=torch.__version__, threads=torch.get_num_threads())

    def _pick_layers(self, model) -> Dict[str, Tuple]:
        """Each of `LAYERS` (the first converted layer of that stride and 224 px input size) with its convolution."""
        import torch
        import torch.nn as nn

        import timm_tcnn
        shapes = {}

        def record(module, args) -> None:
            shapes.setdefault(module, tuple(args[0].shape))
        hooks = [layer.register_forward_pre_hook(record) for _, layer in timm_tcnn.attention_layers(model)]
        with torch.no_grad():
            model(torch.zeros(1, 3, 224, 224))
        for hook in hooks:
            hook.remove()
        picked = {}
        for name, (stride, size) in LAYERS.items():
            layer = next((m for m, s in shapes.items() if m.stride == stride and s[-1] == size), None)
            if layer is None:
                continue
            conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride, layer.kernel_size // 2,
                             groups=layer.groups, bias=layer.bias is not None)
            with torch.no_grad():
                conv.weight.copy_(layer.weight)
                if layer.bias is not None:
                    conv.bias.copy_(layer.bias)
            picked[name] = (layer, conv, shapes[layer][1])
        return picked

    def _input(self, *shape: int):
        import torch
        if shape not in self.inputs:
            self.inputs[shape] = torch.randn(*shape, generator=torch.Generator().manual_seed(self.config['seed']))
        return self.inputs[shape]

    def _fn(self, part: str, setting: str, state: Optional[str]):
        """The call to time: `state` None is the CNN side."""
        import torch
        batch = self.config['batch_size']
        if part == 'infer':
            size = int(setting)
            model = self.cnn if state is None else self.models[state]
            x = self._input(batch, 3, size, size)

            def run():
                with torch.no_grad():
                    model(x)
            return run
        layer, conv, channels = self.layers[state or self.config['states'][0]][setting]
        module = conv if state is None else self.layers[state][setting][0]
        size = LAYERS[setting][1]
        x = self._input(batch, channels, size, size)
        if part == 'layer-infer':
            def run():
                with torch.no_grad():
                    module(x)
            return run
        x = x.clone().requires_grad_()
        params = [p for p in module.parameters()]

        def run():
            for p in params + [x]:
                p.grad = None
            module(x).sum().backward()
        return run

    def flops(self, part: str, setting: str, state: str) -> float:
        """CNN / T-CNN FLOPs of a layer measurement."""
        from torch.utils.flop_counter import FlopCounterMode
        counts = []
        for side in (None, state):
            with FlopCounterMode(display=False) as counter:
                self._fn(part, setting, side)()
            counts.append(counter.get_total_flops())
        return counts[0] / counts[1]

    def time(self, part: str, setting: str, state: Optional[str]) -> float:
        fn = self._fn(part, setting, state)
        key = (part, setting, state)
        if key not in self.warm:
            fn()
            self.warm.add(key)
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


def worker_main() -> int:
    worker = None
    for line in sys.stdin:
        command = json.loads(line)
        try:
            if command['op'] == 'init':
                worker = Worker(command['config'])
                reply = worker.info
            elif command['op'] == 'time':
                reply = {'seconds': worker.time(command['part'], command['setting'], command['state'])}
            else:
                reply = {'flop_ratio': worker.flops(command['part'], command['setting'], command['state'])}
        except Exception as e:  # reported to the parent, which stops the run
            reply = {'error': f'{type(e).__name__}: {e}'}
        print(json.dumps(reply), flush=True)
    return 0


# ---- the parent: trees, processes, interleaving, table

def _git(*args: str) -> str:
    result = subprocess.run(['git', '-C', str(ROOT), *args], capture_output=True, text=True)
    if result.returncode:
        raise CompareError(f'git {" ".join(args)}: {result.stderr.strip()}')
    return result.stdout.strip()


class Tree:
    """A tree to measure: the working tree (a path) or a commit checked out in a temporary worktree."""

    def __init__(self, spec: str, label: str):
        self.label, self.worktree = label, None
        if Path(spec).is_dir() and (Path(spec) / 'timm_tcnn').is_dir():
            head = _git("rev-parse", "--short", "HEAD")
            self.path, self.name = Path(spec).resolve(), f'{spec} (working tree at {head})'
            return
        commit = _git('rev-parse', '--verify', '--quiet', f'{spec}^{{commit}}') if spec else ''
        if not commit:
            raise CompareError(f'{spec!r} is neither a commit nor a folder with timm_tcnn/.')
        self.worktree = Path(tempfile.mkdtemp(prefix=f'tcnn-{commit[:7]}-'))
        _git('worktree', 'add', '--detach', str(self.worktree), commit)
        self.path, self.name = self.worktree, f'{commit[:7]} ({_git("log", "-1", "--format=%s", commit)[:60]})'

    def remove(self) -> None:
        if self.worktree is not None:
            subprocess.run(
                ['git', '-C', str(ROOT), 'worktree', 'remove', '--force', str(self.worktree)], capture_output=True
            )


class Process:
    """One tree's worker process."""

    def __init__(self, tree: Tree, config: Dict):
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(
                [str(tree.path)] + ([os.environ['PYTHONPATH']] if os.environ.get('PYTHONPATH') else [])
            ),
        )
        env.pop('TIMM_TCNN_ATTENTION_PATH', None)
        self.tree = tree
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), '--worker'],
            cwd=tree.path,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        info = self.ask(op='init', config=config)
        expected = tree.path / 'timm_tcnn' / '__init__.py'
        if Path(info['file']).resolve() != expected.resolve():
            raise CompareError(f'{tree.name}: the worker imported {info["file"]}, not {expected}.')
        self.info = info

    def ask(self, **command) -> Dict:
        self.proc.stdin.write(json.dumps(command) + '\n')
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise CompareError(f'{self.tree.name}: the worker stopped (see its output above).')
        reply = json.loads(line)
        if 'error' in reply:
            raise CompareError(f'{self.tree.name}: {reply["error"]}')
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def _spread(values: Sequence[float]) -> str:
    return f'{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})'


def measurements(args: argparse.Namespace) -> List[Tuple[str, str]]:
    """(part, setting) pairs in the order they are measured."""
    out = [('infer', str(size)) for size in args.sizes] if 'infer' in args.parts else []
    for part in ('layer-infer', 'layer-train'):
        if part in args.parts:
            out += [(part, name) for name in LAYERS]
    return out


def compare(args: argparse.Namespace) -> str:
    config = dict(
        threads=args.threads,
        seed=args.seed,
        cnn=args.cnn,
        model=args.model,
        stages=args.stages,
        states=args.states,
        batch_size=args.batch_size,
    )
    trees, procs = [], []
    start = time.time()
    try:
        trees = [Tree(args.current, 'now'), Tree(args.baseline, 'before')]
        procs = [Process(tree, config) for tree in trees]
        # per (part, setting, state): per tree the list of per-round ratios CNN time / T-CNN time
        ratios: Dict[Tuple, List[List[float]]] = {}
        seconds: Dict[Tuple, List[List[float]]] = {}
        for round_index in range(args.rounds):
            order = procs if round_index % 2 == 0 else procs[::-1]
            for part, setting in measurements(args):
                base = {id(p): p.ask(op='time', part=part, setting=setting, state=None)['seconds'] for p in order}
                for state in args.states:
                    key = (part, setting, state)
                    ratios.setdefault(key, [[], []])
                    seconds.setdefault(key, [[], []])
                    for p in order:
                        t = p.ask(op='time', part=part, setting=setting, state=state)['seconds']
                        i = procs.index(p)
                        ratios[key][i].append(base[id(p)] / t)
                        seconds[key][i].append(t)
            print(f'round {round_index + 1}/{args.rounds} done, {time.time() - start:.0f} s', file=sys.stderr)
        flop_ratio = {
            key: procs[0].ask(op='flops', part=key[0], setting=key[1], state=key[2])['flop_ratio']
            for key in ratios
            if key[0] != 'infer'
        }
    finally:
        for p in procs:
            p.close()
        for tree in trees:
            tree.remove()
    lines = [
        f'now: {trees[0].name}; before: {trees[1].name}.',
        f'{args.model} (stages {", ".join(map(str, args.stages))}, strided convolutions converted, random weights, '
        f'seed {args.seed}) vs {args.cnn}; batch {args.batch_size}; {args.rounds} rounds alternating the trees; '
        f'{procs[0].info["threads"]} torch threads, torch {procs[0].info["torch"]}; {time.time() - start:.0f} s.',
        'ratio: CNN time / T-CNN time (model: throughput T-CNN / CNN; layer: convolution / converted layer), median '
        'over rounds (range); now / before: median (range) of the per-round quotients; efficiency = ratio / '
        '(CNN / T-CNN FLOPs).',
        'States: ' + '; '.join(f'{s}: {STATES[s]}' for s in args.states) + '.',
        '',
        '| part | setting | state | now | before | now / before | efficiency now | efficiency before | '
        'T-CNN ms now / before |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for (part, setting, state), (now, before) in ratios.items():
        quotients = [a / b for a, b in zip(now, before)]
        flops = flop_ratio.get((part, setting, state))
        eff = (
            ('', '')
            if flops is None
            else (f'{statistics.median(now) / flops:.2f}', f'{statistics.median(before) / flops:.2f}')
        )
        label = f'{setting}px' if part == 'infer' else setting
        ms = seconds[(part, setting, state)]
        lines.append(
            f'| {part} | {label} | {state} | {_spread(now)} | {_spread(before)} | {_spread(quotients)} | '
            f'{eff[0]} | {eff[1]} | {1e3 * statistics.median(ms[0]):.0f} / '
            f'{1e3 * statistics.median(ms[1]):.0f} |'
        )
    return '\n'.join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('baseline', help='the earlier commit (anything git rev-parse takes)')
    parser.add_argument(
        '--current', default=str(ROOT), help='the tree to compare: a folder (default: this working tree) or a commit'
    )
    parser.add_argument('--states', nargs='+', choices=list(STATES), default=list(STATES))
    parser.add_argument('--parts', nargs='+', choices=PARTS, default=list(PARTS))
    parser.add_argument('--sizes', nargs='+', type=int, default=[224, 448], help='inference image sizes (px)')
    parser.add_argument('--model', default='tcnn_resnet50rs')
    parser.add_argument('--cnn', default='resnetrs50', help="the T-CNN's CNN")
    parser.add_argument('--stages', nargs='+', type=int, default=[3, 4], help='converted stages')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--threads', type=int, default=2, help='torch threads of each process')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', help='also write the table to this file')
    args = parser.parse_args(argv)
    if min(args.sizes) < 32:
        parser.error('--sizes must be >= 32 px (the CNNs downsample 32x)')
    if args.batch_size < 1 or args.rounds < 1 or args.threads < 1:
        parser.error('--batch-size, --rounds and --threads must be >= 1')
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    if argv is None and sys.argv[1:] == ['--worker']:
        return worker_main()
    args = parse_args(argv)
    try:
        table = compare(args)
    except CompareError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(table)
    if args.out:
        from timm_tcnn.utils.io import atomic_write

        atomic_write(args.out, table + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
