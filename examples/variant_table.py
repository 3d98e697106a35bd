""" The README's table of registered T-CNNs: parameters of CNN and T-CNN, and T-CNN/CNN inference throughput at
the default stages (batch 8, 224 px, interleaved, median of 3), T-CNNs in the benchmark's `spread` state.

    python examples/variant_table.py [NAME ...] > table.md
"""
import sys
import time

import timm_tcnn
from timm_tcnn.tools.bench import bench_variant

if __name__ == '__main__':
    names = sys.argv[1:] or list(timm_tcnn.VARIANTS)
    print('| T-CNN | CNN | stages | converted layers | CNN params | T-CNN params | T-CNN/CNN throughput |')
    print('|---|---|---|---|---|---|---|')
    for name in names:
        start = time.time()
        r = bench_variant(name)
        print(f'| `{name}` | `{r["cnn"]}` | {", ".join(map(str, r["stages"]))} | {r["layers"]} | '
              f'{r["cnn_params"] / 1e6:.2f}M | {r["tcnn_params"] / 1e6:.2f}M | {r["ratio"]:.2f} |', flush=True)
        print(f'{name}: {time.time() - start:.0f} s', file=sys.stderr, flush=True)
