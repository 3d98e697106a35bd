""" `timm-tcnn bench`: T-CNN vs CNN speed, FLOPs and memory ratios, measured side by side. """
import argparse
import os
import platform
import resource
import sys
import time

import timm
import torch

from ...errors import InputError
from ...models.variants import VARIANTS
from ...tools.bench import (
    CONFIGS,
    DENSE_STATES,
    LAYER_SHAPES,
    STATES,
    BenchSetup,
    available_memory,
    bench_dense,
    bench_gpsa,
    bench_layers,
    bench_models,
    bench_shapes,
    create_pair,
    dense_memory_estimate,
    dense_models,
    format_table,
    network_train_bytes,
)
from ...utils.io import atomic_write, check_output_file
from .common import add_device_arg, resolve_device

PARTS = ('models', 'layers', 'shapes', 'gpsa', 'dense')
DEFAULT_PARTS = ('models', 'layers', 'shapes', 'gpsa')  # dense: asked for (minutes per output stride at 512 px)
AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'bench',
        help='measure T-CNN vs CNN throughput, FLOPs and memory ratios on this machine',
        description='Benchmark a T-CNN against its CNN, its converted layers against the convolutions they '
                    'replaced, single layers at ResNet-50-RS and ConvNeXt shapes, the attention layer against '
                    'timm\'s ConViT GPSA, and (--parts dense) the T-CNN as a dense-prediction backbone '
                    '(features_only, output_stride 16 and 8, 512 px) against its CNN. Everything is timed round-robin '
                    'in one run (medians), so ratios are robust to machine load; the full default run takes 10-15 '
                    'minutes on a 2-core CPU. '
                    'On a GPU, timm\'s usual training set-up is e.g. --device cuda --amp bf16 --channels-last '
                    '--batch-size 128 (add --compile for torch.compile); on CUDA both sides run with cuDNN '
                    'autotuning and TF32 matmuls, as timm\'s train.py sets there.',
    )
    parser.add_argument('--parts', nargs='+', choices=PARTS, default=list(DEFAULT_PARTS),
                        help=f'what to measure (default: {" ".join(DEFAULT_PARTS)}; dense only when named)')
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
    parser.add_argument('--shapes', nargs='+', choices=list(LAYER_SHAPES), default=list(LAYER_SHAPES),
                        metavar='SHAPE', help=f'single-layer shapes (part "shapes"): {", ".join(LAYER_SHAPES)}')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--reps', type=int, default=3, help='timed repetitions per measurement (median)')
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: leave as is)')
    setup = parser.add_argument_group('where and how both sides run')
    add_device_arg(setup, ' of both sides')
    setup.add_argument('--amp', choices=list(AMP_DTYPES), default='none', help='autocast dtype (default: none)')
    setup.add_argument('--channels-last', action='store_true', help='channels-last models and inputs')
    setup.add_argument('--compile', action='store_true',
                       help='torch.compile both sides (static shapes); compilation time is reported apart')
    state = parser.add_argument_group('state of the T-CNNs (see timm_tcnn.bench.set_state)')
    state.add_argument('--state', choices=STATES, default='spread',
                       help='spread (default): locality strengths spread over [0.25, 4] with 1 among them, half the '
                            'content gates closed, content logits std 4; uniform: the earlier state, every gate '
                            '--gate and every strength --alpha, then --finetune-steps Adam steps')
    state.add_argument('--finetune-steps', type=int, default=3, help='uniform: Adam steps after opening the gates')
    state.add_argument('--gate', type=float, default=0.3, help='uniform: content and locality gates before those steps')
    state.add_argument('--alpha', type=float, default=0.5, help='uniform: Gaussian positional strength (softened)')
    state.add_argument('--qk-std', type=float, default=0.1, help='uniform: std of the Q/K weights')
    dense = parser.add_argument_group('part "dense": backbones (features_only) at dense-prediction sizes')
    dense.add_argument('--output-strides', nargs='+', type=int, choices=(8, 16), default=[16, 8],
                       help='output strides measured, one after the other (default: 16 8)')
    dense.add_argument('--dense-size', type=int, default=512, help='image size (default: 512)')
    dense.add_argument('--dense-batch-size', type=int, default=2, help='batch size (default: 2)')
    dense.add_argument('--dense-states', nargs='+', choices=DENSE_STATES, default=['fresh', 'spread'],
                       help='T-CNN states measured side by side (default: fresh spread): fresh = as converted, every '
                            'gate 0 (inference runs the convolutions, training the attention); spread, uniform: as '
                            '--state says')
    dense.add_argument('--memory-limit-gb', type=float, default=None,
                       help='refuse a setting whose attention is estimated to need more (default: the memory '
                            'available now, MemAvailable on CPU, free memory on a GPU)')
    parser.add_argument('--quick', action='store_true',
                        help='a smoke run: default config, 160 px only, no memory, one layer shape, 1 repetition')
    parser.add_argument('--out', metavar='FILE', help='also write the Markdown table (with machine info) to FILE')
    parser.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    if args.quick:
        args.configs, args.sizes, args.train_sizes = ['default'], [160], [160]
        args.memory_size, args.layer_size, args.reps, args.finetune_steps = 0, 160, 1, 1
        args.shapes = args.shapes[-1:]
        args.dense_size = min(args.dense_size, 128)
    if min(args.sizes + args.train_sizes + [args.layer_size, args.memory_size or 32, args.dense_size]) < 32:
        raise InputError('image sizes must be >= 32 px (the CNNs downsample 32x).')
    if min(args.batch_size, args.dense_batch_size, args.reps, args.finetune_steps) < 1:
        raise InputError('--batch-size, --dense-batch-size, --reps and --finetune-steps must be >= 1.')
    if args.memory_limit_gb is not None and not args.memory_limit_gb > 0:
        raise InputError(f'--memory-limit-gb must be > 0, got {args.memory_limit_gb}.')
    if not 0 < args.gate < 1:
        raise InputError(f'--gate must be in (0, 1), got {args.gate}: gates at 0 or 1 are not a fine-tuned-like '
                         f'state.')
    if args.threads < 0:
        raise InputError(f'--threads must be >= 0, got {args.threads}.')
    args.device = resolve_device(args.device)
    if args.amp == 'fp16' and args.device.type == 'cpu':
        raise InputError('--amp fp16 is for GPUs; on CPU use --amp bf16 or none.')
    if args.out:
        check_output_file(args.out)


def _check_dense(args: argparse.Namespace, setup: BenchSetup) -> dict:
    """The attention's estimated memory at every output stride (`dense_memory_estimate`), checked against the
    limit before anything is measured: what the largest setting holds at once (a training step, and what the
    fine-tuned states keep of their inference) must fit."""
    limit = available_memory(setup.device) if args.memory_limit_gb is None else int(args.memory_limit_gb * 2 ** 30)
    source = ('--memory-limit-gb' if args.memory_limit_gb is not None else
              'free GPU memory' if setup.device.type == 'cuda' else 'MemAvailable')
    kept_states = sum(state != 'fresh' for state in args.dense_states)
    estimates = {}
    for output_stride in args.output_strides:
        tcnn = timm.create_model(args.model, features_only=True, output_stride=output_stride)
        estimate = dense_memory_estimate(tcnn, args.dense_size, args.dense_batch_size)
        network = network_train_bytes(tcnn, args.dense_size, args.dense_batch_size)
        del tcnn
        kept = kept_states * estimate.kept
        needed = network + max(estimate.inference, estimate.train) + kept
        if needed > limit:
            raise InputError(
                f'the dense setting at output stride {output_stride} ({args.dense_size} px, batch '
                f'{args.dense_batch_size}, {estimate.layers} converted layers of up to {estimate.tokens} tokens) needs '
                f'an estimated {needed / 2 ** 30:.2f} GiB (the attention of a training step '
                f'{estimate.train / 2 ** 30:.2f} GiB, the rest of the step {network / 2 ** 30:.2f} GiB, inference '
                f'plans kept {kept / 2 ** 30:.2f} GiB), over the limit of {limit / 2 ** 30:.2f} GiB ({source}); lower '
                f'--dense-batch-size or --dense-size, leave out --output-strides {output_stride}, or raise '
                f'--memory-limit-gb.')
        estimates[output_stride] = estimate, network
    estimates['limit'] = (limit, source)
    return estimates


def _dense_note(args: argparse.Namespace, estimates: dict) -> str:
    limit, source = estimates['limit']
    parts = ', '.join(f'OS {s}: {e.layers} converted layers of up to {e.tokens} tokens, training step '
                      f'{e.train / 2 ** 30:.2f} GiB (the rest of the step {network / 2 ** 30:.2f} GiB), inference '
                      f'{e.inference / 2 ** 30:.2f} GiB'
                      for s, (e, network) in estimates.items() if s != 'limit')
    note = (f'Dense part: {args.model} vs {VARIANTS[args.model].cnn} as features_only backbones (all feature maps, '
            f'loss = sum of their mean squares); attention estimated beforehand ({parts}), limit {limit / 2 ** 30:.1f} '
            f'GiB ({source}).')
    if sys.platform.startswith('linux'):
        note += f' Peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.1f} GiB.'
    return note


def _machine(setup: BenchSetup) -> str:
    return (f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
            f'{torch.get_num_threads()} torch threads, torch {torch.__version__}, {platform.system()}; '
            f'run on {setup.describe()}')


def run(args: argparse.Namespace) -> int:
    _check(args)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        # every model and shape is its own graph of the same forward code: keep them all compiled
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        torch._dynamo.config.accumulated_cache_size_limit = max(
            torch._dynamo.config.accumulated_cache_size_limit, 1024)
    setup = BenchSetup(args.device, AMP_DTYPES[args.amp], args.channels_last, args.compile)
    setup.configure_backends()
    start = time.time()
    results, notes, warmup = [], [], {}
    uniform = dict(steps=args.finetune_steps, gate=args.gate, alpha=args.alpha, qk_std=args.qk_std)
    if 'dense' in args.parts:
        dense = _check_dense(args, setup)  # before any long work
    if 'models' in args.parts or 'layers' in args.parts:
        models, description = create_pair(args.configs, model=args.model, state=args.state,
                                          **(uniform if args.state == 'uniform' else {}))
        notes.append(description + '.')
        if 'models' in args.parts:
            results += bench_models(models, args.sizes, args.train_sizes, args.memory_size or None,
                                    args.batch_size, args.reps, setup, warmup)
        if 'layers' in args.parts:
            results += bench_layers(models, args.layer_size, args.batch_size, args.reps, setup)
    if 'shapes' in args.parts:
        results += bench_shapes(args.shapes, args.batch_size, args.reps, setup, args.state)
    if 'gpsa' in args.parts:
        results += bench_gpsa(batch_size=args.batch_size, reps=args.reps, setup=setup)
    if 'dense' in args.parts:
        for output_stride in args.output_strides:
            models, descriptions = dense_models(args.model, output_stride, args.dense_states,
                                                **(uniform if 'uniform' in args.dense_states else {}))
            for description in descriptions:
                if description + '.' not in notes:
                    notes.append(description + '.')
            results += bench_dense(models, output_stride, args.dense_size, args.dense_batch_size, args.reps, setup,
                                   dense[output_stride][0])
            del models
        notes.append(_dense_note(args, dense))
    if warmup:
        notes.append('Warm-up (first call of each measurement' + (', compilation included' if args.compile else '')
                     + '), models part: ' + ', '.join(f'{name} {seconds:.0f} s' for name, seconds in warmup.items())
                     + '.')
    table = format_table(results)
    batch = ', '.join(([f'batch {args.batch_size}'] if set(args.parts) - {'dense'} else [])
                      + ([f'dense: batch {args.dense_batch_size}'] if 'dense' in args.parts else []))
    header = (f'Machine: {_machine(setup)}. {batch[0].upper() + batch[1:]}, median of {args.reps}, '
              f'{time.time() - start:.0f} s in total.\n' + ''.join(note + '\n' for note in notes) +
              'ratio: T-CNN/CNN throughput (infer, train; layers-*, shape-*: converted layers/convs), T-CNN/CNN peak '
              'memory (train-memory), ours/GPSA GFLOP/s (gpsa); FLOP ratio: CNN/T-CNN FLOPs (gpsa: GPSA/ours); '
              'efficiency = ratio / FLOP ratio; dense-*: T-CNN/CNN backbone throughput and peak memory, the '
              'T-CNN state as config.\n')
    print(header + table)
    if args.out:
        atomic_write(args.out, header + '\n' + table + '\n')
    return 0
