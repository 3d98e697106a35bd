""" `timm-tcnn bench`: T-CNN vs CNN speed, FLOPs and memory ratios, measured side by side. """
import argparse
import os
import platform
import time

import torch

from ..bench import CONFIGS, bench_gpsa, bench_layers, bench_models, create_pair, format_table
from ..errors import InputError
from ..io import atomic_write, check_output_file
from ..variants import VARIANTS

PARTS = ('models', 'layers', 'gpsa')


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'bench',
        help='measure T-CNN vs CNN throughput, FLOPs and memory ratios on this machine',
        description='Benchmark a T-CNN (fine-tuned-like state) against its CNN, its converted layers '
                    'against the convolutions they replaced, and the attention layer against timm\'s ConViT GPSA. '
                    'Everything is timed round-robin in one run (medians), so ratios are robust to machine load; '
                    'the full default run is sized to take under 10 minutes on an idle 2-core CPU.',
    )
    parser.add_argument('--parts', nargs='+', choices=PARTS, default=list(PARTS), help='what to measure')
    parser.add_argument('--model', choices=list(VARIANTS), default='tcnn_resnet50rs',
                        help='the T-CNN, measured against its CNN (default: tcnn_resnet50rs vs resnetrs50)')
    parser.add_argument('--configs', nargs='+', choices=list(CONFIGS), default=list(CONFIGS),
                        help='T-CNN configurations: default = stage 4 incl. its strided conv; s34-full = stages 3 '
                             'and 4 incl. strided; s34-stride1 = stages 3 and 4, stride-1 convs only; '
                             's4-stride1 = stage 4, stride-1 convs only')
    parser.add_argument('--sizes', nargs='*', type=int, default=[160, 224, 320, 448], help='inference image sizes')
    parser.add_argument('--train-sizes', nargs='*', type=int, default=[160, 224], help='training-step image sizes')
    parser.add_argument('--memory-size', type=int, default=224, help='image size of the peak-memory step (0: skip)')
    parser.add_argument('--layer-size', type=int, default=224, help='image size for the layers-alone comparison')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--reps', type=int, default=3, help='timed repetitions per measurement (median)')
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: leave as is)')
    state = parser.add_argument_group('fine-tuned-like state of the T-CNNs (see timm_tcnn.bench.fine_tune_like)')
    state.add_argument('--finetune-steps', type=int, default=3, help='Adam steps after opening the gates')
    state.add_argument('--gate', type=float, default=0.3, help='content and locality gates before those steps')
    state.add_argument('--alpha', type=float, default=0.5, help='Gaussian positional strength (softened)')
    state.add_argument('--qk-std', type=float, default=0.1, help='std of the Q/K weights')
    parser.add_argument('--quick', action='store_true',
                        help='a smoke run: default config, 160 px only, no memory, 1 repetition')
    parser.add_argument('--out', metavar='FILE', help='also write the Markdown table (with machine info) to FILE')
    parser.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    if args.quick:
        args.configs, args.sizes, args.train_sizes = ['default'], [160], [160]
        args.memory_size, args.layer_size, args.reps, args.finetune_steps = 0, 160, 1, 1
    if min(args.sizes + args.train_sizes + [args.layer_size, args.memory_size or 32]) < 32:
        raise InputError('image sizes must be >= 32 px (the CNNs downsample 32x).')
    if args.batch_size < 1 or args.reps < 1 or args.finetune_steps < 1:
        raise InputError('--batch-size, --reps and --finetune-steps must be >= 1.')
    if not 0 < args.gate < 1:
        raise InputError(f'--gate must be in (0, 1), got {args.gate}: gates at 0 or 1 are not a fine-tuned-like '
                         f'state.')
    if args.threads < 0:
        raise InputError(f'--threads must be >= 0, got {args.threads}.')
    if args.out:
        check_output_file(args.out)


def _machine() -> str:
    return (f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
            f'{torch.get_num_threads()} torch threads, torch {torch.__version__}, {platform.system()}')


def run(args: argparse.Namespace) -> int:
    _check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    results = []
    if 'models' in args.parts or 'layers' in args.parts:
        models = create_pair(args.configs, model=args.model, steps=args.finetune_steps, gate=args.gate, alpha=args.alpha,
                             qk_std=args.qk_std)
        if 'models' in args.parts:
            results += bench_models(models, args.sizes, args.train_sizes, args.memory_size or None,
                                    args.batch_size, args.reps)
        if 'layers' in args.parts:
            results += bench_layers(models, args.layer_size, args.batch_size, args.reps)
    if 'gpsa' in args.parts:
        results += bench_gpsa(batch_size=args.batch_size, reps=args.reps)
    table = format_table(results)
    header = (f'Machine: {_machine()}. Batch {args.batch_size}, median of {args.reps}, '
              f'{time.time() - start:.0f} s in total.\n'
              'ratio: T-CNN/CNN throughput (infer, train; layers-*: converted layers/convs), T-CNN/CNN peak '
              'memory (train-memory), ours/GPSA GFLOP/s (gpsa); FLOP ratio: CNN/T-CNN FLOPs (gpsa: GPSA/ours); '
              'efficiency = ratio / FLOP ratio.\n')
    print(header + table)
    if args.out:
        atomic_write(args.out, header + '\n' + table + '\n')
    return 0
