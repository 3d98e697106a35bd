""" The README's table of registered T-CNNs: parameters of CNN and T-CNN, and T-CNN/CNN inference throughput at
the default stages (batch 8, 224 px, interleaved, median of --reps), T-CNNs in a benchmark state (`spread` unless
--state says otherwise).

    python examples/variant_table.py [NAME ...] [--reps 7] [--state spread] > table.md
"""
import argparse
import sys
import time

import timm_tcnn
from timm_tcnn.tools.bench import STATES, bench_variant

if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('names', nargs='*', metavar='NAME', help='registered T-CNNs (default: all)')
    parser.add_argument('--reps', type=int, default=5, help='timed calls per model (median)')
    parser.add_argument('--state', choices=STATES, default='spread', help='benchmark state of the T-CNNs')
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(timm_tcnn.VARIANTS))
    if unknown:
        parser.error(f'not registered T-CNNs: {", ".join(unknown)}; choose from {", ".join(timm_tcnn.VARIANTS)}')
    if args.reps < 1:
        parser.error('--reps must be >= 1')
    print(f'T-CNN/CNN inference throughput: batch 8, 224 px, state `{args.state}`, median of {args.reps}')
    print()
    print('| T-CNN | CNN | stages | converted layers | CNN params | T-CNN params | T-CNN/CNN throughput |')
    print('|---|---|---|---|---|---|---|')
    for name in args.names or list(timm_tcnn.VARIANTS):
        start = time.time()
        r = bench_variant(name, reps=args.reps, state=args.state)
        print(f'| `{name}` | `{r["cnn"]}` | {", ".join(map(str, r["stages"]))} | {r["layers"]} | '
              f'{r["cnn_params"] / 1e6:.2f}M | {r["tcnn_params"] / 1e6:.2f}M | {r["ratio"]:.2f} |', flush=True)
        print(f'{name}: {time.time() - start:.0f} s', file=sys.stderr, flush=True)
