""" Everything GPU-related in one run, written as JSON: the check to run first whenever a GPU is available.

    python examples/gpu_check.py --out gpu_check.json            # CUDA: about 4 minutes on an H200
    python examples/gpu_check.py --device cpu --quick --out x.json  # the same code paths, small, on CPU

Measures, each T-CNN side by side with its CNN in one run (`timm_tcnn.tools.bench`, interleaved medians, T-CNNs in the
benchmark's `spread` state; bf16 autocast, channels-last and timm train.py's cuDNN/TF32 settings on CUDA):
- `operations`: operations per converted layer, training step and inference call (host time on a GPU);
- `kernels`: the positional attention's Triton kernels at each layer shape: accepted by their first-use check
  against the closed form (or the warning), and the time of building P and its gradient, kernels vs closed form;
- `sdpa`: each scaled_dot_product_attention backend at the layers' shapes (queries/keys `tcnn_qk_dim` wide, values
  full width and shared by the heads): runs or not (the error), time, peak memory, error against the math backend;
- `shapes`: single layers against their convolutions, per configuration (`explicit` and `fused` paths with the
  positional kernels, `explicit-closed-form` without them);
- `models`: tcnn_resnet50rs (stage 4, and stages 3+4) against resnetrs50, per path: inference, training,
  peak training memory;
- `compiled`: torch.compile'd training steps of T-CNN and CNN, compile time and throughput ratio;
- `kernel_report`: the positional kernels compiled ahead of time (`timm_tcnn.tools.kernel_report`) for this GPU's
  compute capability and sm_80/sm_90 at every launch configuration of the registered variants (with `--quick`, of
  the benchmark's layer shapes): registers, spills and shared memory per kernel configuration and target.
"""
import argparse
import dataclasses
import json
import math
import platform
import time
import traceback
import warnings
from typing import Callable, Dict, List, Sequence

import timm
import torch
import torch.nn.functional as F

import timm_tcnn
from timm_tcnn.layers import GatedPositionalAttention2d, positional_kernels_enabled, set_positional_kernels
from timm_tcnn.layers.positional import ClosedFormPositional, cached_positional_tables
from timm_tcnn.tools.bench import LAYER_SHAPES, BenchSetup, bench_models, bench_shapes, create_pair, spread_layer_state
from timm_tcnn.tools.op_count import layer_step_ops

BACKENDS = ('FLASH_ATTENTION', 'EFFICIENT_ATTENTION', 'CUDNN_ATTENTION', 'MATH')
# configuration -> positional kernels on (where they can run)
CONFIGS = {'explicit': True, 'explicit-closed-form': False}


def operations() -> Dict[str, Dict[str, int]]:
    out = {}
    for name, (channels, size, stride, kernel, groups) in LAYER_SHAPES.items():
        generator = torch.Generator().manual_seed(0)
        layer = GatedPositionalAttention2d(channels, channels, kernel, stride, False, groups, grad_floor=0.1,
                                           gate_lr_scale=30., attention_block_bytes=512 * 2 ** 20)
        x = torch.randn(2, channels, size, size, generator=generator)
        with torch.no_grad():
            spread_layer_state(layer, x, generator, 4., 0.5)
        forward, backward, inference = layer_step_ops(layer, x)
        out[name] = dict(train_forward=forward, train_backward=backward, inference=inference)
    return out


def _timed(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def positional_kernels(setup: BenchSetup, reps: int) -> Dict[str, Dict]:
    """Per layer shape: the kernels' first-use check, and P built and differentiated by kernels and closed form."""
    if not positional_kernels_enabled(setup.device):
        return dict(skipped=f'the kernels do not run on {setup.device.type}')
    from timm_tcnn.layers.positional_kernels import checked_kernels
    out = {}
    for name, (channels, size, stride, kernel, groups) in LAYER_SHAPES.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            kernels = checked_kernels(kernel, stride, size, size, False, setup.device)
        result = dict(accepted=kernels is not None, warnings=[str(w.message) for w in caught])
        if kernels is not None:
            closed = ClosedFormPositional(cached_positional_tables(kernel, stride, size, size, False, setup.device))
            heads = kernel * kernel
            values = torch.cat([torch.rand(2 * heads), torch.randn(3 * heads)]).to(setup.device)
            values[:2 * heads].clamp_(0, 1)
            for label, builder in (('kernels', kernels), ('closed_form', closed)):
                def step(builder=builder):
                    dense, saved = builder.forward(values, 0.1)
                    builder.backward(dense, values, saved, 0.1)
                result[f'{label}_ms'] = 1e3 * _timed(step, setup.device, reps)
        out[name] = result
    return out


def sdpa_backends(setup: BenchSetup, batch_size: int, reps: int, qk_dim: int = 32) -> List[Dict]:
    """Forward + backward of the fused path's content call at each layer shape, per backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    dtype = setup.amp_dtype or torch.float32
    for name, (channels, size, stride, _, _) in LAYER_SHAPES.items():
        if 'depthwise' in name:
            continue
        generator = torch.Generator().manual_seed(0)
        num_keys, num_queries = size * size, ((size - 1) // stride + 1) ** 2
        q = torch.randn(batch_size, 9, num_queries, qk_dim, generator=generator).to(setup.device, dtype)
        k = torch.randn(batch_size, 9, num_keys, qk_dim, generator=generator).to(setup.device, dtype)
        tokens = torch.randn(batch_size, num_keys, channels, generator=generator).to(setup.device, dtype)
        grad = torch.randn(batch_size, 9, num_queries, channels, generator=generator).to(setup.device, dtype)
        reference = None
        for backend in BACKENDS:
            row = dict(shape=name, backend=backend, batch_size=batch_size, dtype=str(dtype))
            qi, ki, ti = (t.detach().clone().requires_grad_() for t in (q, k, tokens))

            def step():
                out = F.scaled_dot_product_attention(qi, ki, ti[:, None].expand(-1, 9, -1, -1), scale=qk_dim ** -0.5)
                out.backward(grad)
                return out

            try:
                with sdpa_kernel([getattr(SDPBackend, backend)]):
                    if setup.device.type == 'cuda':
                        torch.cuda.reset_peak_memory_stats(setup.device)
                    out = step()
                    row['ms'] = 1000 * _timed(step, setup.device, reps)
                    if setup.device.type == 'cuda':
                        row['peak_mib'] = torch.cuda.max_memory_allocated(setup.device) / 2 ** 20
                if reference is None:
                    reference = out.detach().float()
                row['max_rel_error_vs_first'] = ((out.detach().float() - reference).abs().max()
                                                 / reference.abs().max()).item()
                row['runs'] = True
            except Exception as e:  # a backend that does not take these shapes says why
                row.update(runs=False, error=f'{type(e).__name__}: {str(e).splitlines()[0][:300]}')
            rows.append(row)
    return rows


def _results(results) -> List[Dict]:
    return [dict(part=r.part, config=r.config, setting=r.setting, ratio=r.ratio,
                 flop_ratio=None if math.isnan(r.flop_ratio) else r.flop_ratio, detail=r.detail) for r in results]


def compiled_training(setup: BenchSetup, size: int, batch_size: int, reps: int) -> Dict:
    """torch.compile'd training steps of tcnn_resnet50rs (spread state) and resnetrs50: compile seconds, steps/s."""
    models, description = create_pair(['default'])
    out = dict(state=description)
    generator = torch.Generator().manual_seed(0)
    x = setup.input(batch_size, 3, size, size, generator=generator)
    y = torch.randint(1000, (batch_size,), generator=generator).to(setup.device)
    steps = {}
    for name, model in models.items():
        model = setup.prepare(model).train()
        compiled = torch.compile(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step(compiled=compiled, optimizer=optimizer):
            with setup.autocast():
                loss = F.cross_entropy(compiled(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        start = time.perf_counter()
        step()
        setup.synchronize()
        out[f'{name}_compile_s'] = time.perf_counter() - start
        steps[name] = step
    times = {name: _timed(fn, setup.device, reps) for name, fn in steps.items()}
    out.update(ratio=times['cnn'] / times['default'], tcnn_img_s=batch_size / times['default'],
               cnn_img_s=batch_size / times['cnn'], size=size, batch_size=batch_size)
    return out


def kernel_compile_report(device: torch.device, quick: bool) -> Dict:
    """The ahead-of-time compilation report for this GPU's capability and sm_80/sm_90; a reason where Triton or
    its bundled ptxas is missing."""
    import importlib.util
    if importlib.util.find_spec('triton') is None:
        return dict(skipped='Triton is not installed')
    import triton

    from timm_tcnn.layers.positional_kernels import KernelPositional
    from timm_tcnn.tools import kernel_report as kr
    targets, limits = {80, 90}, {}
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        local = 10 * props.major + props.minor
        targets.add(local)
        limits[local] = getattr(props, 'shared_memory_per_block_optin', 0) or kr.SHARED_LIMITS[local]
    if any(kr.ptxas_path(target) is None for target in targets):
        return dict(skipped='no bundled ptxas in the Triton installation')
    geometries = None
    if quick:
        geometries = [KernelPositional(kernel, stride, size, size, (0, 0))
                      for _, size, stride, kernel, _ in LAYER_SHAPES.values()]
    rows, skipped = kr.kernel_report(geometries, sorted(targets), limits)
    return dict(triton=triton.__version__, targets=sorted(targets), skipped=skipped,
                all_within_limits=all(r.ok for r in rows), summary=kr.summary(rows),
                rows=[dict(dataclasses.asdict(r), ok=r.ok) for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--out', required=True, help='JSON file to write')
    parser.add_argument('--quick', action='store_true', help='small sizes and batches: a check of the script itself')
    parser.add_argument('--skip', nargs='*', default=[],
                        choices=['kernels', 'sdpa', 'shapes', 'models', 'compiled', 'kernel_report'])
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    setup = BenchSetup(device, torch.bfloat16 if cuda else None, channels_last=cuda)
    setup.configure_backends()
    batch, reps = (2, 1) if args.quick else (128, 10)
    sizes = dict(infer=[64] if args.quick else [224, 448], train=[64] if args.quick else [160, 224],
                 memory=64 if args.quick else 224)
    report = dict(
        machine=dict(device=setup.describe(), torch=torch.__version__, timm=timm.__version__,
                     timm_tcnn=timm_tcnn.__version__, python=platform.python_version(),
                     cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if cuda else None),
        settings=dict(batch_size=batch, reps=reps, sizes=sizes, quick=args.quick),
        errors={})
    start = time.time()

    def part(name: str, fn: Callable[[], object]) -> None:
        if name in args.skip:
            return
        t0 = time.time()
        try:
            report[name] = fn()
        except Exception:
            report['errors'][name] = traceback.format_exc(limit=5)
        report.setdefault('seconds', {})[name] = round(time.time() - t0, 1)
        with open(args.out, 'w') as f:  # what is measured so far survives a timeout
            json.dump(report, f, indent=1)
        print(f'{name}: {time.time() - t0:.0f} s', flush=True)

    part('operations', operations)
    part('kernels', lambda: positional_kernels(setup, reps))
    part('sdpa', lambda: sdpa_backends(setup, batch, reps))

    def per_config(fn: Callable[[], List], configs: Sequence[str] = ('explicit',)) -> Dict[str, List[Dict]]:
        out = {}
        for config in configs:
            set_positional_kernels(CONFIGS[config])
            try:
                out[config] = _results(fn())
            finally:
                set_positional_kernels(True)
        return out

    shapes = [name for name in LAYER_SHAPES if 'depthwise' not in name]
    part('shapes', lambda: per_config(
        lambda: bench_shapes(shapes[-1:] if args.quick else shapes, batch, reps, setup), tuple(CONFIGS)))
    model_configs = ['default'] if args.quick else ['default', 's34-full']

    def models():
        pair, description = create_pair(model_configs)
        out = per_config(
            lambda: bench_models(pair, sizes['infer'], sizes['train'], sizes['memory'], batch, reps, setup))
        out['state'] = description
        return out

    part('models', models)
    part('compiled', lambda: compiled_training(setup, 64 if args.quick else 224, batch, 3 if args.quick else reps))
    part('kernel_report', lambda: kernel_compile_report(device, args.quick))
    report['total_s'] = round(time.time() - start, 1)
    with open(args.out, 'w') as f:
        json.dump(report, f, indent=1)
    print(f'wrote {args.out} ({report["total_s"]:.0f} s)')


if __name__ == '__main__':
    main()
