""" Side-by-side speed, FLOPs and memory of T-CNNs against their CNN, on the machine at hand.

Every number is a ratio measured in one run, interleaved (CNN, T-CNN, CNN, ...) and repeated,
taking medians, so that machine load affects both sides alike:

- `models`: a registered T-CNN (default `tcnn_resnet50rs`, several conversion configurations) vs its CNN: inference
  throughput (eval, no autograd), training-step throughput (forward + backward + optimizer step),
  FLOPs (`torch.utils.flop_counter`), arithmetic efficiency = throughput ratio / FLOP ratio, and
  peak memory of a training step.
- `layers`: the converted layers of each configuration alone vs the convolutions they replaced.
- `shapes`: one layer vs its convolution at the shapes that matter (`LAYER_SHAPES`: ResNet-50-RS stages 3
  and 4, ConvNeXt's 7x7 depthwise), inference and forward + backward.
- `gpsa`: one `GatedPositionalAttention2d` vs timm's ConViT `GPSA` (forward + backward) on the same
  token grid, width and 9 heads: time, FLOPs, GFLOP/s.
- `dense`: the T-CNN as a dense-prediction backbone (`features_only`, `output_stride` 16 or 8, default 512 px,
  batch 2) vs its CNN as the same backbone: inference and training-step throughput and peak memory, in the freshly
  converted state (`fresh`: inference runs the convolutions, training the attention) and the fine-tuned ones.
  `dense_memory_estimate` says beforehand what the attention will hold.

T-CNNs are measured in a state that fine-tuning reaches (`STATES`): by default `spread_state` (per-head
locality strengths spread over [0.25, 4] with the conversion value 1 among them, half the content gates
still closed, content logits of std 4), or the older `uniform` state (`fine_tune_like`: every gate 0.3,
every strength 0.5). The freshly converted state, which inference runs as plain convolutions, is never
what is measured, except by `dense`, where it is one of the states, named as such. `BenchSetup` holds the
device, autocast dtype, memory format and `torch.compile`.
"""
import contextlib
import copy
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, Iterable, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count
from tqdm import tqdm

from ..layers import GatedPositionalAttention2d
from ..models.convert import attention_layers, conv_to_attention, convolution_of
from ..models.options import GATE_LR_SCALE, GRAD_FLOOR
from ..models.variants import variant
from .analysis import content_logits

__all__ = [
    'CONFIGS', 'STATES', 'LAYER_SHAPES', 'BenchSetup', 'Result', 'fine_tune_like', 'spread_state', 'set_state',
    'create_pair', 'count_flops', 'peak_train_memory', 'bench_variant', 'bench_models', 'bench_layers',
    'bench_shapes', 'bench_gpsa', 'DENSE_STATES', 'DenseEstimate', 'dense_models', 'dense_memory_estimate',
    'bench_dense', 'network_train_bytes', 'available_memory', 'format_table',
]

# configuration name -> T-CNN keyword arguments
CONFIGS: Dict[str, Dict] = {
    'default': dict(tcnn_stages=(4,), tcnn_convert_strided=True),
    's34-full': dict(tcnn_stages=(3, 4), tcnn_convert_strided=True),
    's34-stride1': dict(tcnn_stages=(3, 4), tcnn_convert_strided=False),
    's4-stride1': dict(tcnn_stages=(4,), tcnn_convert_strided=False),
}

STATES = ('spread', 'uniform')
DENSE_STATES = ('fresh',) + STATES  # fresh: as converted, every gate 0

# name -> (channels, input size, stride, kernel size, groups) of single-layer comparisons (224 px images)
LAYER_SHAPES: Dict[str, Tuple[int, int, int, int, int]] = {
    'resnet50rs stage 3, 14x14': (256, 14, 1, 3, 1),
    'resnet50rs stage 3, 28x28 -> 14x14': (256, 28, 2, 3, 1),
    'resnet50rs stage 4, 7x7': (512, 7, 1, 3, 1),
    'convnext_tiny stage 4, 7x7 depthwise 7x7': (768, 7, 1, 7, 768),
}


@dataclass
class BenchSetup:
    """Where and how models run: device, autocast dtype (None: off), channels-last memory format, and
    `torch.compile` (static shapes) of both sides. On CUDA, `configure_backends` sets what timm's train.py sets
    there (cuDNN autotuning, TF32 matmuls), so that neither side is measured in a set-up users do not train in."""
    device: torch.device = torch.device('cpu')
    amp_dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    compile: bool = False

    def configure_backends(self) -> None:
        if self.device.type == 'cuda':
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.benchmark = True

    def autocast(self) -> ContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def input(self, *shape: int, generator: torch.Generator) -> torch.Tensor:
        """A random input of `shape`, on the device, channels-last where asked for (4D only)."""
        x = torch.randn(*shape, generator=generator).to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def prepare(self, module: nn.Module) -> nn.Module:
        """`module` on the device, in the memory format, compiled where asked for."""
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return torch.compile(module, dynamic=False) if self.compile else module

    def synchronize(self) -> None:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == 'cuda' else 'CPU'
        amp = 'float32' if self.amp_dtype is None else f'autocast {str(self.amp_dtype).replace("torch.", "")}'
        backends = ''
        if self.device.type == 'cuda':
            backends = (f', cudnn.benchmark={torch.backends.cudnn.benchmark}, '
                        f'TF32 matmuls={torch.backends.cuda.matmul.allow_tf32}')
        return (f'{self.device.type} ({name}), {amp}, {"channels-last" if self.channels_last else "NCHW"}, '
                f'{"torch.compile (static shapes)" if self.compile else "eager"}{backends}')


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
        layer.qk.weight.copy_(torch.randn(layer.qk.weight.shape, generator=generator) * qk_std)


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
    """The `uniform` state: put a converted model, in place, in a state like one after fine-tuning, and return
    it in eval mode.

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


def _layer_inputs(model: nn.Module, x: torch.Tensor) -> List[Tuple[GatedPositionalAttention2d, torch.Tensor]]:
    """Every converted layer of `model` with its input when `model` (eval, no autograd) runs on `x`."""
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: inputs.append((m, args[0])))
             for _, layer in attention_layers(model)]
    try:
        with torch.no_grad():
            model.eval()(x.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return inputs


@torch.no_grad()
def spread_layer_state(layer: GatedPositionalAttention2d, x: torch.Tensor, generator: torch.Generator,
                       logit_std: float, closed_share: float) -> None:
    """One layer in the `spread` state (`spread_state`), its content logits of std `logit_std` on input `x`."""
    heads = layer.num_heads
    alpha = torch.linspace(math.log(0.25), math.log(4.), heads).exp()
    alpha[heads // 2] = 1.  # the conversion value
    content = torch.empty(heads).uniform_(0.05, 0.3, generator=generator)
    content[torch.randperm(heads, generator=generator)[:int(heads * closed_share)]] = -0.02  # closed: clamped to 0
    centre = layer.conversion_values()['pos_center'].cpu() + torch.randn(heads, 2, generator=generator) * 0.3
    layer.set_attention_values(
        content_gate=content,
        locality_gate=torch.empty(heads).uniform_(0.05, 0.3, generator=generator),
        pos_log_alpha=alpha[torch.randperm(heads, generator=generator)].log(),
        pos_center=centre,
    )
    layer.qk.weight.copy_(torch.randn(layer.qk.weight.shape, generator=generator))
    std = content_logits(layer, x).std()
    layer.qk.weight.mul_((logit_std / std).sqrt())


def spread_state(
        model: nn.Module,
        img_size: int = 96,
        logit_std: float = 4.,
        closed_share: float = 0.5,
        seed: int = 0,
) -> nn.Module:
    """The `spread` state, the one fine-tuning passes through: set in place, returned in eval mode.

    Per layer: locality strengths alpha spread log-uniformly over [0.25, 4] across heads, with the conversion
    value 1 among them; `closed_share` of the heads with their content gate still closed (stored below 0,
    clamped to 0, as heads that fine-tuning pushed shut), the others' in [0.05, 0.3]; locality gates in [0.05,
    0.3]; Gaussian centres off their taps (std 0.3 px); Q/K scaled so that the content logits have std
    `logit_std` on the layer's own inputs (random images of `img_size` px). The content branch runs (some gates
    are open) and the positional part has the strong, weak and closed heads of a real fine-tune.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, img_size, img_size, generator=generator)
    for layer, layer_input in _layer_inputs(model, x):
        spread_layer_state(layer, layer_input, generator, logit_std, closed_share)
    return model.eval()


def set_state(model: nn.Module, state: str, seed: int = 0, **uniform_kwargs) -> str:
    """Put a converted model in benchmark state `state` (one of `STATES`) and say what was measured."""
    if state == 'spread':
        spread_state(model, seed=seed)
        return ('T-CNN state "spread": per-head locality strength over [0.25, 4] (1 among them), half the content '
                'gates closed (0), the others and the locality gates in [0.05, 0.3], content logits std 4')
    if state == 'uniform':
        fine_tune_like(model, seed=seed, **uniform_kwargs)
        options = {'gate': 0.3, 'alpha': 0.5, 'steps': 3, **uniform_kwargs}
        return (f'T-CNN state "uniform": every gate {options["gate"]}, every locality strength {options["alpha"]}, '
                f'then {options["steps"]} Adam steps')
    raise ValueError(f'unknown state {state!r}: choose from {STATES}.')


def create_pair(
        configs: Sequence[str],
        seed: int = 0,
        model: str = 'tcnn_resnet50rs',
        state: str = 'spread',
        **uniform_kwargs,
) -> Tuple[Dict[str, nn.Module], str]:
    """A registered T-CNN's CNN ('cnn') and the T-CNN in each configuration, from the same weights, on CPU,
    the T-CNNs in benchmark state `state` (`set_state`); also the state's description."""
    unknown = [name for name in configs if name not in CONFIGS]
    if unknown:
        raise ValueError(f'unknown configuration {unknown}: choose from {list(CONFIGS)}.')
    cnn = variant(model).cnn
    torch.manual_seed(seed)
    models = {'cnn': timm.create_model(cnn).eval()}
    cnn_state = models['cnn'].state_dict()
    description = ''
    for name in configs:
        tcnn = timm.create_model(model, **CONFIGS[name])
        tcnn.load_state_dict(cnn_state)  # CNN weights convert on load
        description = set_state(tcnn, state, seed=seed, **uniform_kwargs)
        models[name] = tcnn
    return models, description


def _timed(fn: Callable[[], object], setup: BenchSetup) -> float:
    setup.synchronize()
    start = time.perf_counter()
    fn()
    setup.synchronize()
    return time.perf_counter() - start


def _interleaved(
        fns: Dict[str, Callable[[], object]],
        reps: int,
        setup: BenchSetup,
        progress: Optional[tqdm] = None,
        warmup: Optional[Dict[str, float]] = None,
        warm_up: bool = True,
) -> Dict[str, float]:
    """Median seconds per call of each function, run round-robin `reps` times after a warm-up each (whose
    seconds, compilation included, go to `warmup`; none with `warm_up=False`, for functions run before)."""
    for name, fn in fns.items() if warm_up else ():
        seconds = _timed(fn, setup)
        if warmup is not None:
            warmup[name] = warmup.get(name, 0.) + seconds
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_timed(fn, setup))
            if progress is not None:
                progress.update()
    return {name: statistics.median(t) for name, t in times.items()}


def _infer_fn(model: nn.Module, x: torch.Tensor, setup: BenchSetup) -> Callable[[], object]:
    def run():
        with torch.no_grad(), setup.autocast():
            return model(x)
    return run


def _train_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, setup: BenchSetup) -> Callable[[], object]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)

    def run():
        model.train()
        with setup.autocast():
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.eval()
    return run


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of a convolution's backward: each of the input and weight gradients costs the forward's. (torch's
    own formula counts grouped convolutions' input gradients as dense: `groups` times too many.)"""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-add) of matmuls, convolutions and attention ops run by `fn`."""
    custom = {torch.ops.aten.convolution_backward: _conv_backward_flop}
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        fn()
    return counter.get_total_flops()


def _peak_memory(step: Callable[[], object], model: nn.Module, setup: BenchSetup) -> int:
    """Peak bytes during one call of `step` (run once before, so that optimizer state exists), with `model`'s
    parameters and buffers: on CPU, live tensors tracked per tensor by torch's `MemTracker` (independent of the
    allocator); on a GPU, the caching allocator's peak of allocated bytes. What converted layers keep for
    inference (`inference.py`) is dropped before the tracked call, so that it is counted there."""
    step()
    for _, layer in attention_layers(model):
        layer._plans.clear()
    if setup.device.type == 'cuda':
        setup.synchronize()
        torch.cuda.reset_peak_memory_stats(setup.device)
        step()
        setup.synchronize()
        return torch.cuda.max_memory_allocated(setup.device)
    from torch.distributed._tools.mem_tracker import MemTracker
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        step()
    return sum(v['Total'] for v in tracker.get_tracker_snapshot('peak').values())


def peak_train_memory(model: nn.Module, x: torch.Tensor, y: torch.Tensor, setup: BenchSetup = BenchSetup()) -> int:
    """Peak bytes during one training step (parameters, gradients, activations, optimizer state, temporaries).

    On CPU, live tensors tracked per tensor by torch's `MemTracker` (independent of the allocator); on a GPU,
    the caching allocator's peak of allocated bytes.
    """
    return _peak_memory(_train_fn(model, x, y, setup), model, setup)


def bench_models(
        models: Dict[str, nn.Module],
        infer_sizes: Sequence[int] = (160, 224, 320, 448),
        train_sizes: Sequence[int] = (160, 224),
        memory_size: Optional[int] = 224,
        batch_size: int = 8,
        reps: int = 3,
        setup: BenchSetup = BenchSetup(),
        warmup: Optional[Dict[str, float]] = None,
) -> List[Result]:
    """Inference and training-step throughput, FLOP ratios and peak training memory of every
    T-CNN in `models` against `models['cnn']` (eager models on CPU, run as `setup` says). FLOPs are counted
    on the eager models; warm-up seconds (compilation included) are added to `warmup` per model."""
    configs = [name for name in models if name != 'cnn']
    flop_models = models
    models = {name: setup.prepare(model) for name, model in models.items()}
    results = []
    generator = torch.Generator().manual_seed(0)
    total = len(models) * reps * (len(infer_sizes) + len(train_sizes))
    with tqdm(total=total, desc='models', leave=False) as progress:
        for mode, sizes in (('infer', infer_sizes), ('train', train_sizes)):
            for size in sizes:
                x = setup.input(batch_size, 3, size, size, generator=generator)
                y = torch.randint(1000, (batch_size,), generator=generator).to(setup.device)
                make = (lambda m: _infer_fn(m, x, setup)) if mode == 'infer' else (lambda m: _train_fn(m, x, y, setup))
                flops = {name: count_flops(make(model)) for name, model in flop_models.items()}
                times = _interleaved({name: make(model) for name, model in models.items()}, reps, setup, progress,
                                     warmup)
                for name in configs:
                    results.append(Result(
                        mode, name, f'{size}px', times['cnn'] / times[name], flops['cnn'] / flops[name],
                        f'{batch_size / times[name]:.1f} vs {batch_size / times["cnn"]:.1f} img/s'))
    if memory_size:
        x = setup.input(batch_size, 3, memory_size, memory_size, generator=generator)
        y = torch.randint(1000, (batch_size,), generator=generator).to(setup.device)
        peak = {name: peak_train_memory(model, x, y, setup)
                for name, model in tqdm(models.items(), desc='memory', leave=False)}
        for name in configs:
            results.append(Result(
                'train-memory', name, f'{memory_size}px', peak[name] / peak['cnn'],
                detail=f'{peak[name] / 2 ** 20:.0f} vs {peak["cnn"] / 2 ** 20:.0f} MiB'))
    return results


def bench_variant(name: str, size: int = 224, batch_size: int = 8, reps: int = 3,
                  state: str = 'spread') -> Dict[str, object]:
    """A registered T-CNN (default options, benchmark state `state`) vs its CNN: parameters, converted layers
    and inference throughput ratio (T-CNN / CNN), timed interleaved on CPU."""
    cnn_name = variant(name).cnn
    cnn = timm.create_model(cnn_name).eval()
    tcnn = timm.create_model(name)
    tcnn.load_state_dict(cnn.state_dict())  # CNN weights convert on load
    set_state(tcnn, state)
    setup = BenchSetup()
    x = torch.randn(batch_size, 3, size, size)
    times = _interleaved({'cnn': _infer_fn(cnn, x, setup), 'tcnn': _infer_fn(tcnn, x, setup)}, reps, setup)
    return dict(
        cnn=cnn_name,
        stages=tcnn.tcnn_options.stages,
        layers=len(list(attention_layers(tcnn))),
        cnn_params=sum(p.numel() for p in cnn.parameters()),
        tcnn_params=sum(p.numel() for p in tcnn.parameters()),
        ratio=times['cnn'] / times['tcnn'],
    )


def _layer_fns(
        pairs: Sequence[Tuple[nn.Module, nn.Module, torch.Tensor]],
        mode: str,
        setup: BenchSetup,
) -> Dict[str, Callable[[], object]]:
    """Run every (attention layer, convolution, input) pair's attention side or convolution side: inference, or
    forward + backward with respect to the input and the parameters ('train')."""
    def run(use_attention: bool):
        for layer, conv, x in pairs:
            module = layer if use_attention else conv
            if mode == 'infer':
                with torch.no_grad(), setup.autocast():
                    module(x)
            else:
                with setup.autocast():
                    out = module(x)
                out.float().sum().backward()
    return {'conv': lambda: run(False), 'attn': lambda: run(True)}


def _grad_input(setup: BenchSetup, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    return setup.input(*shape, generator=generator).requires_grad_()


def _layer_result(
        part: str, config: str, setting: str, pairs, flop_pairs, mode: str, setup: BenchSetup, reps: int,
) -> Result:
    eager = BenchSetup(setup.device, setup.amp_dtype)
    flops = {k: count_flops(fn) for k, fn in _layer_fns(flop_pairs, mode, eager).items()}
    times = _interleaved(_layer_fns(pairs, mode, setup), reps, setup)
    return Result(f'{part}-{mode}', config, setting, times['conv'] / times['attn'], flops['conv'] / flops['attn'],
                  f'{1e3 * times["attn"]:.1f} vs {1e3 * times["conv"]:.1f} ms')


def bench_layers(
        models: Dict[str, nn.Module],
        size: int = 224,
        batch_size: int = 8,
        reps: int = 3,
        setup: BenchSetup = BenchSetup(),
) -> List[Result]:
    """The converted layers of each T-CNN alone (at their shapes in the model) vs the convolutions they replaced."""
    results = []
    generator = torch.Generator().manual_seed(0)
    for name, model in tqdm([(n, m) for n, m in models.items() if n != 'cnn'], desc='layers', leave=False):
        eager = []
        for layer, x in _layer_inputs(model, torch.zeros(1, 3, size, size)):
            x = torch.randn((batch_size,) + tuple(x.shape[1:]), generator=generator).to(x.device)
            eager.append((layer, convolution_of(layer), x))
        pairs = [(setup.prepare(layer), setup.prepare(conv), _grad_input(setup, x.shape, generator))
                 for layer, conv, x in eager]
        flop_pairs = [(layer.to(setup.device), conv.to(setup.device), x.to(setup.device).requires_grad_())
                      for layer, conv, x in eager]
        for mode in ('infer', 'train'):
            results.append(_layer_result('layers', name, f'{size}px, {len(pairs)} layers', pairs, flop_pairs, mode,
                                         setup, reps))
    return results


def bench_shapes(
        shapes: Sequence[str] = tuple(LAYER_SHAPES),
        batch_size: int = 8,
        reps: int = 3,
        setup: BenchSetup = BenchSetup(),
        state: str = 'spread',
) -> List[Result]:
    """One layer (the T-CNNs' default options) vs its convolution at each of `LAYER_SHAPES`, in state `state`
    (calibrated on the input)."""
    results = []
    generator = torch.Generator().manual_seed(0)
    for shape in tqdm(shapes, desc='shapes', leave=False):
        channels, size, stride, kernel_size, groups = LAYER_SHAPES[shape]
        conv = nn.Conv2d(channels, channels, kernel_size, stride, kernel_size // 2, groups=groups)
        layer = conv_to_attention(conv, gate_lr_scale=GATE_LR_SCALE, grad_floor=GRAD_FLOOR)  # as in T-CNNs
        x = torch.randn(batch_size, channels, size, size, generator=generator)
        if state == 'spread':
            spread_layer_state(layer, x, generator, logit_std=4., closed_share=0.5)
        else:
            _open_attention(layer, 0.3, 0.5, 0.1, generator)
        layer.eval()
        flop_pair = [(layer.to(setup.device), conv.to(setup.device), x.to(setup.device).requires_grad_())]
        pair = [(setup.prepare(layer), setup.prepare(conv), _grad_input(setup, x.shape, generator))]
        setting = f'{shape}, {channels} ch, batch {batch_size}'
        for mode in ('infer', 'train'):
            results.append(_layer_result('shape', f'{layer.num_heads} heads', setting, pair, flop_pair, mode, setup,
                                         reps))
    return results


def bench_gpsa(
        shapes: Iterable[Tuple[str, int, int]] = (('stage3', 252, 14), ('stage4', 504, 7)),
        batch_size: int = 8,
        reps: int = 3,
        setup: BenchSetup = BenchSetup(),
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
        ours, gpsa = ours.to(setup.device), gpsa.to(setup.device)
        x_map = torch.randn(batch_size, width, grid, grid, generator=generator).to(setup.device).requires_grad_()
        x_tok = torch.randn(batch_size, grid * grid, width, generator=generator).to(setup.device).requires_grad_()

        def fwd_bwd(module, x):
            def run():
                with setup.autocast():
                    out = module(x)
                out.float().sum().backward()
            return run
        fns = {'ours': fwd_bwd(ours, x_map), 'gpsa': fwd_bwd(gpsa, x_tok)}
        flops = {k: count_flops(fn) for k, fn in fns.items()}
        times = _interleaved(fns, reps, setup)
        rate = {k: flops[k] / times[k] / 1e9 for k in fns}
        results.append(Result(
            'gpsa', stage, f'{grid}x{grid}, width {width}, 9 heads', rate['ours'] / rate['gpsa'],
            flops['gpsa'] / flops['ours'],
            f'{rate["ours"]:.0f} vs {rate["gpsa"]:.0f} GFLOP/s, {1e3 * times["ours"]:.0f} vs '
            f'{1e3 * times["gpsa"]:.0f} ms, {flops["ours"] / flops["gpsa"]:.1f}x FLOPs'))
    return results


def dense_models(
        model: str = 'tcnn_resnet50rs',
        output_stride: int = 8,
        states: Sequence[str] = ('fresh', 'spread'),
        seed: int = 0,
        **uniform_kwargs,
) -> Tuple[Dict[str, nn.Module], List[str]]:
    """The CNN of a registered T-CNN as a dense-prediction backbone ('cnn': `features_only`, `output_stride`) and the
    T-CNN (its default options) as the same backbone in each of `states` (`DENSE_STATES`), from the same weights, on
    CPU in eval mode; also what each state is. States are set on the whole model (`uniform` trains its classifier),
    whose weights the backbone then loads."""
    unknown = [state for state in states if state not in DENSE_STATES]
    if unknown:
        raise ValueError(f'unknown state {unknown}: choose from {DENSE_STATES}.')
    torch.manual_seed(seed)
    cnn = timm.create_model(variant(model).cnn, output_stride=output_stride)
    models = {'cnn': timm.create_model(variant(model).cnn, features_only=True, output_stride=output_stride)}
    _load_backbone(models['cnn'], cnn.state_dict())
    descriptions = []
    for state in states:
        tcnn = timm.create_model(model, output_stride=output_stride)
        tcnn.load_state_dict(cnn.state_dict())  # CNN weights convert on load
        if state == 'fresh':
            descriptions.append('T-CNN state "fresh": as converted, every gate 0 (inference runs the convolutions, '
                                'a training step the attention)')
        else:
            descriptions.append(set_state(tcnn, state, seed=seed, **uniform_kwargs))
        models[state] = timm.create_model(model, features_only=True, output_stride=output_stride)
        _load_backbone(models[state], tcnn.state_dict())
    return {name: m.eval() for name, m in models.items()}, descriptions


def _load_backbone(backbone: nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    missing = backbone.load_state_dict(state_dict, strict=False).missing_keys
    if missing:
        raise RuntimeError(f'the features_only model did not get {missing} from the whole model')


@dataclass
class DenseEstimate:
    """What the converted layers' attention holds at once, estimated from their shapes before anything runs:
    `inference` bytes during a forward pass without autograd (the positional attention kept per layer, plus the
    largest layer's tables), `train` bytes during a training step (per layer the softmax of every sample, the
    positional attention and its Gaussian kept for backward, plus the largest layer's tables and backward
    temporaries), `kept` bytes the positional attention of every layer stays in memory between inference calls.
    `layers` and `tokens` (the largest key count) describe the setting."""
    inference: int
    train: int
    kept: int
    layers: int
    tokens: int


def _layer_shapes(model: nn.Module, img_size: int) -> List[Tuple[GatedPositionalAttention2d, int, int]]:
    """(layer, input height, width) of every converted layer at `img_size` px: one image through `model` (freshly
    converted: plain convolutions)."""
    shapes = [(layer, x.shape[-2], x.shape[-1]) for layer, x in _layer_inputs(model, torch.zeros(1, 3, img_size,
                                                                                                 img_size))]
    return shapes


def dense_memory_estimate(model: nn.Module, img_size: int, batch_size: int) -> DenseEstimate:
    """`DenseEstimate` of `model` (a T-CNN, any state: it is run freshly converted on one image to find the layers'
    map sizes) at `img_size` px and `batch_size`, float32. A (queries, heads, keys) float32 matrix is the unit U of a
    layer: inference holds U per layer (its positional attention, kept) and, while one layer builds it, that
    layer's one-hot and offset tables (U + 5 U / heads); a training step keeps (batch + 2) U per layer for backward
    and, in the backward pass of one layer, its tables and three more U."""
    probe = copy.deepcopy(model).cpu().float()
    for _, layer in attention_layers(probe):
        layer.set_attention_values(**layer.conversion_values())
    shapes = _layer_shapes(probe, img_size)
    units, tables, tokens = [], [], 0
    for layer, height, width in shapes:
        out_h, out_w = layer.output_size(height, width)
        pairs = out_h * out_w * height * width
        units.append(4 * layer.num_heads * pairs)
        tables.append(4 * layer.num_heads * pairs + 4 * 5 * pairs)
        tokens = max(tokens, height * width)
    if not units:
        return DenseEstimate(0, 0, 0, 0, 0)
    largest = max(u + t for u, t in zip(units, tables))
    return DenseEstimate(
        inference=sum(units) + largest,
        train=(batch_size + 2) * sum(units) + largest + 2 * max(units),
        kept=sum(units),
        layers=len(units),
        tokens=tokens,
    )


def network_train_bytes(model: nn.Module, img_size: int, batch_size: int, probe_size: int = 128) -> int:
    """Estimated peak bytes of a training step of backbone `model` at `img_size` px and `batch_size`: parameters,
    gradients and momentum (3x the parameters) plus what autograd keeps for backward (distinct storages of the
    saved tensors), counted in one forward pass at `probe_size` px, batch 1, and scaled by batch x pixels. For a
    T-CNN, what its CNN's layers hold; the attention's own is `dense_memory_estimate`."""
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    params = {p.data_ptr() for p in model.parameters()}
    model = model.cpu().train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.zeros(1, 3, probe_size, probe_size))
    finally:
        model.eval()
    activations = sum(n for ptr, n in storages.items() if ptr not in params)
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    return int(3 * parameters + batch_size * (img_size / probe_size) ** 2 * activations)


def available_memory(device: torch.device) -> int:
    """Bytes that can be used without swapping: `MemAvailable` of /proc/meminfo on CPU (Linux; elsewhere the
    physical memory), the free memory of a GPU."""
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def _dense_train_fn(model: nn.Module, x: torch.Tensor, setup: BenchSetup) -> Callable[[], object]:
    """A training step of a backbone: forward, the mean square of every feature map as the loss, backward, SGD."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)

    def run():
        model.train()
        with setup.autocast():
            features = model(x)
        loss = sum(f.float().square().mean() for f in features)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.eval()
    return run


def bench_dense(
        models: Dict[str, nn.Module],
        output_stride: int,
        img_size: int = 512,
        batch_size: int = 2,
        reps: int = 3,
        setup: BenchSetup = BenchSetup(),
        estimate: Optional[DenseEstimate] = None,
) -> List[Result]:
    """Inference and training-step throughput and peak memory of every T-CNN backbone in `models` (by state, from
    `dense_models`) against `models['cnn']`, at `img_size` px and `batch_size`: rows `dense-infer`, `dense-train`
    (T-CNN / CNN throughput), `dense-infer-memory`, `dense-train-memory` (T-CNN / CNN peak bytes, `_peak_memory`),
    `config` naming the state. Memory is measured first (two calls each, the warm-up of the eager models), then
    times, interleaved."""
    states = [name for name in models if name != 'cnn']
    models = {name: setup.prepare(model) for name, model in models.items()}
    generator = torch.Generator().manual_seed(0)
    x = setup.input(batch_size, 3, img_size, img_size, generator=generator)
    setting = f'OS {output_stride}, {img_size}px, batch {batch_size}'
    results = []
    with tqdm(total=2 * len(models) * (reps + 1), desc=f'dense OS {output_stride}', leave=False) as progress:
        for mode in ('infer', 'train'):
            make = (lambda m: _infer_fn(m, x, setup)) if mode == 'infer' else (lambda m: _dense_train_fn(m, x, setup))
            fns, peak = {name: make(model) for name, model in models.items()}, {}
            for name, model in models.items():
                peak[name] = _peak_memory(fns[name], model, setup)
                progress.update()
            # measuring memory ran every function twice: the warm-up of eager models
            times = _interleaved(fns, reps, setup, progress, warm_up=setup.compile)
            for name in states:
                results.append(Result(
                    f'dense-{mode}', name, setting, times['cnn'] / times[name],
                    detail=f'{1e3 * times[name]:.0f} vs {1e3 * times["cnn"]:.0f} ms per batch'))
            for name in states:
                attention = '' if estimate is None else (
                    f', attention estimated {(estimate.inference if mode == "infer" else estimate.train) / 2 ** 20:.0f}'
                    f' MiB')
                results.append(Result(
                    f'dense-{mode}-memory', name, setting, peak[name] / peak['cnn'],
                    detail=f'{peak[name] / 2 ** 20:.0f} vs {peak["cnn"] / 2 ** 20:.0f} MiB{attention}'))
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
