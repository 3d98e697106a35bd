""" Side-by-side speed, FLOPs and memory of T-CNNs against their CNN, on the machine at hand.

Every number is a ratio measured in one run, interleaved (CNN, T-CNN, CNN, ...) and repeated,
taking medians, so that machine load affects both sides alike:

- `models`: a registered T-CNN (default `tcnn_resnet50rs`, several conversion configurations) vs its CNN: inference
  throughput (eval, no autograd), training-step throughput (forward + backward + optimizer step),
  FLOPs (`torch.utils.flop_counter`), arithmetic efficiency = throughput ratio / FLOP ratio, and
  peak memory of a training step.
- `layers`: the converted layers of each configuration alone vs the convolutions they replaced.
- `gpsa`: one `GatedPositionalAttention2d` vs timm's ConViT `GPSA` (forward + backward) on the same
  token grid, width and 9 heads: time, FLOPs, GFLOP/s.

T-CNNs are measured in a fine-tuned-like state (`fine_tune_like`): gates opened, positional
attention softened and a few optimiser steps taken. The freshly converted state, which inference
runs as plain convolutions, is not what is measured.
"""
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import timm

from .attention import GatedPositionalAttention2d
from .convert import attention_layers, convolution_of
from .variants import variant

__all__ = [
    'CONFIGS', 'Result', 'fine_tune_like', 'create_pair', 'count_flops', 'peak_train_memory',
    'bench_variant', 'bench_models', 'bench_layers', 'bench_gpsa', 'format_table',
]

# configuration name -> T-CNN keyword arguments
CONFIGS: Dict[str, Dict] = {
    'default': dict(tcnn_stages=(4,), tcnn_convert_strided=True),
    's34-full': dict(tcnn_stages=(3, 4), tcnn_convert_strided=True),
    's34-stride1': dict(tcnn_stages=(3, 4), tcnn_convert_strided=False),
    's4-stride1': dict(tcnn_stages=(4,), tcnn_convert_strided=False),
}


@dataclass
class Result:
    """One row of a result table: `ratio` is T-CNN / CNN throughput (or memory, or ours / GPSA GFLOP/s),
    `flop_ratio` is CNN / T-CNN FLOPs, so that efficiency = 1 when time grows exactly with FLOPs."""
    part: str
    config: str
    setting: str
    ratio: float
    flop_ratio: float = float('nan')
    detail: str = ''

    @property
    def efficiency(self) -> float:
        """Throughput ratio / FLOP ratio: 1.0 = the extra FLOPs cost exactly their share of time."""
        return self.ratio / self.flop_ratio


@torch.no_grad()
def _open_attention(model: nn.Module, gate: float, alpha: float, qk_std: float, generator: torch.Generator) -> None:
    for _, layer in attention_layers(model):
        layer.set_attention_values(content_gate=gate, locality_gate=gate, pos_log_alpha=math.log(alpha))
        for w in (layer.q.weight, layer.k.weight):
            w.copy_(torch.randn(w.shape, generator=generator) * qk_std)


def fine_tune_like(
        model: nn.Module,
        steps: int = 3,
        gate: float = 0.3,
        alpha: float = 0.5,
        qk_std: float = 0.1,
        lr: float = 1e-3,
        img_size: int = 96,
        batch_size: int = 4,
        seed: int = 0,
) -> nn.Module:
    """Put a converted model in a state like one after fine-tuning, in place, and return it in eval mode.

    Content and locality gates are set to `gate`, the Gaussian positional attention is softened to
    strength `alpha` (about 1 / alpha px^2 of spread), Q/K get std `qk_std`, then `steps` Adam steps
    on random images and labels move every parameter off these round values. Afterwards no gate is
    at 0 or 1, so no shortcut of the freshly converted state applies.
    """
    generator = torch.Generator().manual_seed(seed)
    _open_attention(model, gate, alpha, qk_std, generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    num_classes = model.get_classifier().out_features
    for _ in range(steps):
        x = torch.randn(batch_size, 3, img_size, img_size, generator=generator)
        y = torch.randint(num_classes, (batch_size,), generator=generator)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    shares = torch.cat([layer.content_share() for _, layer in attention_layers(model)])
    if not ((shares > 0) & (shares < 1)).all():
        raise RuntimeError(f'fine_tune_like left content gates at 0 or 1: {shares.tolist()}')
    return model


def create_pair(
        configs: Sequence[str],
        seed: int = 0,
        model: str = 'tcnn_resnet50rs',
        **finetune_kwargs,
) -> Dict[str, nn.Module]:
    """A registered T-CNN's CNN ('cnn') and the T-CNN in each configuration, from the same weights, the
    T-CNNs put in a fine-tuned-like state by `fine_tune_like(**finetune_kwargs)`."""
    unknown = [name for name in configs if name not in CONFIGS]
    if unknown:
        raise ValueError(f'unknown configuration {unknown}: choose from {list(CONFIGS)}.')
    cnn = variant(model).cnn
    torch.manual_seed(seed)
    models = {'cnn': timm.create_model(cnn).eval()}
    state = models['cnn'].state_dict()
    for name in configs:
        tcnn = timm.create_model(model, **CONFIGS[name])
        tcnn.load_state_dict(state)  # CNN weights convert on load
        models[name] = fine_tune_like(tcnn, seed=seed, **finetune_kwargs)
    return models


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _interleaved(fns: Dict[str, Callable[[], object]], reps: int, progress: Optional[tqdm] = None) -> Dict[str, float]:
    """Median seconds per call of each function, run round-robin `reps` times after one warm-up each."""
    for fn in fns.values():
        fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_timed(fn))
            if progress is not None:
                progress.update()
    return {name: statistics.median(t) for name, t in times.items()}


def _infer_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return model(x)
    return run


def _train_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)

    def run():
        model.train()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.eval()
    return run


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-add) of matmuls, convolutions and attention ops run by `fn`."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_train_memory(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Peak bytes of live tensors (parameters, gradients, activations, optimizer state, temporaries)
    during one training step, tracked per tensor by torch's `MemTracker` (independent of the allocator)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    step = _train_fn(model, x, y)
    step()  # optimizer state exists from the second step on
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        step()
    return sum(v['Total'] for v in tracker.get_tracker_snapshot('peak').values())


def bench_models(
        models: Dict[str, nn.Module],
        infer_sizes: Sequence[int] = (160, 224, 320, 448),
        train_sizes: Sequence[int] = (160, 224),
        memory_size: Optional[int] = 224,
        batch_size: int = 8,
        reps: int = 3,
) -> List[Result]:
    """Inference and training-step throughput, FLOP ratios and peak training memory of every
    T-CNN in `models` against `models['cnn']`."""
    configs = [name for name in models if name != 'cnn']
    results = []
    generator = torch.Generator().manual_seed(0)
    total = len(models) * reps * (len(infer_sizes) + len(train_sizes))
    with tqdm(total=total, desc='models', leave=False) as progress:
        for mode, sizes in (('infer', infer_sizes), ('train', train_sizes)):
            for size in sizes:
                x = torch.randn(batch_size, 3, size, size, generator=generator)
                y = torch.randint(1000, (batch_size,), generator=generator)
                make = (lambda m: _infer_fn(m, x)) if mode == 'infer' else (lambda m: _train_fn(m, x, y))
                fns = {name: make(model) for name, model in models.items()}
                flops = {name: count_flops(fn) for name, fn in fns.items()}
                times = _interleaved(fns, reps, progress)
                for name in configs:
                    results.append(Result(
                        mode, name, f'{size}px', times['cnn'] / times[name], flops['cnn'] / flops[name],
                        f'{batch_size / times[name]:.1f} vs {batch_size / times["cnn"]:.1f} img/s'))
    if memory_size:
        x = torch.randn(batch_size, 3, memory_size, memory_size, generator=generator)
        y = torch.randint(1000, (batch_size,), generator=generator)
        peak = {name: peak_train_memory(model, x, y)
                for name, model in tqdm(models.items(), desc='memory', leave=False)}
        for name in configs:
            results.append(Result(
                'train-memory', name, f'{memory_size}px', peak[name] / peak['cnn'],
                detail=f'{peak[name] / 2 ** 20:.0f} vs {peak["cnn"] / 2 ** 20:.0f} MiB'))
    return results


def bench_variant(name: str, size: int = 224, batch_size: int = 8, reps: int = 3) -> Dict[str, object]:
    """A registered T-CNN (default options, fine-tuned-like) vs its CNN: parameters, converted layers and
    inference throughput ratio (T-CNN / CNN), timed interleaved."""
    cnn_name = variant(name).cnn
    cnn = timm.create_model(cnn_name).eval()
    tcnn = timm.create_model(name)
    tcnn.load_state_dict(cnn.state_dict())  # CNN weights convert on load
    fine_tune_like(tcnn, steps=1, img_size=64, batch_size=2)
    x = torch.randn(batch_size, 3, size, size)
    times = _interleaved({'cnn': _infer_fn(cnn, x), 'tcnn': _infer_fn(tcnn, x)}, reps)
    return dict(
        cnn=cnn_name,
        stages=tcnn.tcnn_options.stages,
        layers=len(list(attention_layers(tcnn))),
        cnn_params=sum(p.numel() for p in cnn.parameters()),
        tcnn_params=sum(p.numel() for p in tcnn.parameters()),
        ratio=times['cnn'] / times['tcnn'],
    )


def _converted_inputs(
        model: nn.Module, size: int, batch_size: int) -> List[Tuple[GatedPositionalAttention2d, torch.Size]]:
    """Every converted layer of `model` with its input shape at `size` px, for a batch of `batch_size`."""
    shapes = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: shapes.append((m, args[0].shape)))
             for _, layer in attention_layers(model)]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return [(m, torch.Size((batch_size,) + tuple(s[1:]))) for m, s in shapes]


def bench_layers(models: Dict[str, nn.Module], size: int = 224, batch_size: int = 8, reps: int = 3) -> List[Result]:
    """The converted layers of each T-CNN alone (at their shapes in the model) vs the convolutions they replaced."""
    results = []
    generator = torch.Generator().manual_seed(0)
    for name, model in tqdm([(n, m) for n, m in models.items() if n != 'cnn'], desc='layers', leave=False):
        pairs = [(layer, convolution_of(layer), torch.randn(shape, generator=generator))
                 for layer, shape in _converted_inputs(model, size, batch_size)]
        for mode in ('infer', 'train'):
            def run(use_attention: bool, mode=mode):
                for layer, conv, x in pairs:
                    module = layer if use_attention else conv
                    if mode == 'infer':
                        with torch.no_grad():
                            module(x)
                    else:
                        module(x.requires_grad_()).sum().backward()
            fns = {'conv': lambda: run(False), 'attn': lambda: run(True)}
            flops = {k: count_flops(fn) for k, fn in fns.items()}
            times = _interleaved(fns, reps)
            results.append(Result(
                f'layers-{mode}', name, f'{size}px, {len(pairs)} layers', times['conv'] / times['attn'],
                flops['conv'] / flops['attn'], f'{1e3 * times["attn"]:.0f} vs {1e3 * times["conv"]:.0f} ms'))
    return results


def bench_gpsa(
        shapes: Iterable[Tuple[str, int, int]] = (('stage3', 252, 14), ('stage4', 504, 7)),
        batch_size: int = 8,
        reps: int = 3,
) -> List[Result]:
    """Our layer vs timm's ConViT GPSA, forward + backward, same grid, width and 9 heads.

    Widths are multiples of 9 (GPSA splits the width across heads): 252 and 504 stand for
    ResNet-50's 256 and 512. The ratio is of achieved GFLOP/s (ours / GPSA's).
    """
    from timm.models.convit import GPSA
    results = []
    generator = torch.Generator().manual_seed(0)
    for stage, width, grid in shapes:
        ours = GatedPositionalAttention2d(width, width, 3)
        _open_attention(ours, 0.3, 0.5, 0.1, generator)
        gpsa = GPSA(width, num_heads=9)
        x_map = torch.randn(batch_size, width, grid, grid, generator=generator, requires_grad=True)
        x_tok = torch.randn(batch_size, grid * grid, width, generator=generator, requires_grad=True)
        fns = {'ours': lambda: ours(x_map).sum().backward(), 'gpsa': lambda: gpsa(x_tok).sum().backward()}
        flops = {k: count_flops(fn) for k, fn in fns.items()}
        times = _interleaved(fns, reps)
        rate = {k: flops[k] / times[k] / 1e9 for k in fns}
        results.append(Result(
            'gpsa', stage, f'{grid}x{grid}, width {width}, 9 heads', rate['ours'] / rate['gpsa'],
            flops['gpsa'] / flops['ours'],
            f'{rate["ours"]:.0f} vs {rate["gpsa"]:.0f} GFLOP/s, {1e3 * times["ours"]:.0f} vs '
            f'{1e3 * times["gpsa"]:.0f} ms, {flops["ours"] / flops["gpsa"]:.1f}x FLOPs'))
    return results


def format_table(results: Sequence[Result]) -> str:
    """Markdown table of results; 'ratio' is T-CNN/CNN throughput, T-CNN/CNN memory, or ours/GPSA GFLOP/s."""
    lines = [
        '| part | config | setting | ratio | FLOP ratio | efficiency | detail |',
        '|---|---|---|---|---|---|---|',
    ]
    for r in results:
        flop = '' if math.isnan(r.flop_ratio) else f'{r.flop_ratio:.2f}'
        eff = '' if math.isnan(r.flop_ratio) or r.part == 'gpsa' else f'{r.efficiency:.2f}'
        lines.append(f'| {r.part} | {r.config} | {r.setting} | {r.ratio:.2f} | {flop} | {eff} | {r.detail} |')
    return '\n'.join(lines)
