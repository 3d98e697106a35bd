""" The positional kernels compiled ahead of time for GPU targets, on any machine (no GPU, no CUDA driver needed).

For every Triton kernel of `layers.positional_kernels`, at the launch configurations the layers of the registered
variants use (`kernel_launches` of each converted layer's geometry, at the variants' train and test image sizes),
the kernel the JIT would build for that launch (Triton's own argument specialisation) is compiled for each target
(sm_80, sm_90, and sm_100 where the bundled ptxas knows it), and Triton's bundled `ptxas -v` reports registers per
thread and spills; shared memory is the compiled kernel's, against the target's per-block limit.

Launches that differ only in runtime scalars compile to one kernel per constexpr configuration (and per scalar the
JIT specialises as the constant 1), so that is what is compiled, once, and reported.

    python -m timm_tcnn.tools.kernel_report            # markdown table
    python -m timm_tcnn.tools.kernel_report --json report.json
"""
import argparse
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch

__all__ = [
    'SHARED_LIMITS', 'Geometry', 'KernelCompile', 'ptxas_path', 'target_support', 'variant_geometries',
    'launch_configs', 'compile_launch', 'kernel_report', 'format_report', 'main',
]

# shared memory per block a kernel may use (the opt-in maximum), bytes
SHARED_LIMITS: Dict[int, int] = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}
MAX_REGISTERS = 255
# dense-prediction shapes the registered variants do not build by default: a dilated stage
EXTRA_GEOMETRIES: Tuple['Geometry', ...] = ()


class Geometry(NamedTuple):
    """A converted layer's shape as the kernels see it."""
    kernel_size: int
    stride: int
    height: int
    width: int
    same_padding: bool = False
    dilation: int = 1

    def kernels(self):
        from ..layers.positional import query_start
        from ..layers.positional_kernels import KernelPositional
        k, s, d = self.kernel_size, self.stride, self.dilation
        starts = (
            query_start(self.height, k, s, self.same_padding, d),
            query_start(self.width, k, s, self.same_padding, d),
        )
        return KernelPositional(k, s, self.height, self.width, starts, d)


@dataclasses.dataclass
class KernelCompile:
    """One kernel configuration compiled for one target, and what ptxas reports for it."""

    kernel: str
    config: str
    target: int
    num_warps: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int
    shared_limit: int
    geometries: List[Geometry]

    @property
    def ok(self) -> bool:
        return (
            self.spill_stores == 0
            and self.spill_loads == 0
            and self.registers <= MAX_REGISTERS
            and self.shared_bytes <= self.shared_limit
        )


def _arch(target: int) -> str:
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    return sm_arch_from_capability(target)


def ptxas_path(target: int) -> Optional[Path]:
    """The ptxas Triton's CUDA backend runs for `target` (bundled with Triton's wheel), None where it is missing."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = Path(get_ptxas(target).path)
    except (ImportError, RuntimeError):
        return None
    return path if path.is_file() else None


def target_support(targets: Iterable[int] = tuple(SHARED_LIMITS)) -> Dict[int, Optional[str]]:
    """Per compute capability, None where the bundled ptxas compiles for it, else why not."""
    support = {}
    for target in targets:
        ptxas = ptxas_path(target)
        if ptxas is None:
            support[target] = f'no ptxas for sm_{target} in the Triton installation'
            continue
        listed = subprocess.run([str(ptxas), '--help'], capture_output=True, text=True).stdout
        support[target] = None if f"'{_arch(target)}'" in listed else f'{ptxas.name} does not list {_arch(target)}'
    return support


def variant_geometries(image_sizes: Optional[Sequence[int]] = None) -> List[Geometry]:
    """The geometries of every converted layer of every registered variant, at its pretrained config's train and
    test image sizes (or at `image_sizes`), found by one forward pass on the meta device per model and size."""
    import timm

    from ..models.convert import attention_layers
    from ..models.variants import VARIANTS

    found = set()
    for name in VARIANTS:
        with torch.device('meta'):
            model = timm.create_model(name).eval()
        cfg = model.pretrained_cfg
        sizes = {tuple(cfg['input_size'][1:]), tuple(cfg.get('test_input_size') or cfg['input_size'])[1:]}
        if image_sizes:
            sizes = {(size, size) for size in image_sizes}

        def record(layer, args):
            height, width = args[0].shape[-2:]
            found.add(Geometry(layer.kernel_size, layer.stride, height, width, layer.same_padding, layer.dilation))

        handles = [layer.register_forward_pre_hook(record) for _, layer in attention_layers(model)]
        try:
            for size in sorted(sizes):
                with torch.enable_grad():  # the attention computation, never the convolution shortcut
                    model(torch.empty(1, 3, *size, device='meta'))
        finally:
            for handle in handles:
                handle.remove()
    return sorted(found)


def _specialisation(launch, target: int):
    """(signature, constexprs, attrs, options) of the kernel the JIT builds for `launch` on `target`: Triton's own
    binding and specialisation of its arguments (float32 tensors stand in for the pointers)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(GPUTarget('cuda', target, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    pointers = [torch.empty(1) for name in fn.arg_names if name.endswith('_ptr')]
    kwargs = dict(num_warps=launch.num_warps, num_stages=launch.num_stages)
    bound, specialisation, options = binder(*pointers, **launch.scalars, **launch.constexprs, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialisation, options)
    return signature, constexprs, attrs, options


def launch_configs(geometries: Iterable[Geometry]) -> Dict[Tuple, Tuple]:
    """Distinct compilations of the layers' launches: key (kernel, constexprs, scalars the JIT specialises to 1,
    warps, stages) -> (a launch, the geometries that use it), the first launch's specialisation standing for all."""
    from ..layers.positional_kernels import kernel_launches

    configs: Dict[Tuple, Tuple] = {}
    for geometry in geometries:
        for has_content in (False, True):
            for launch in kernel_launches(geometry.kernels(), has_content).values():
                ones = tuple(sorted(name for name, value in launch.scalars.items() if value == 1))
                key = (
                    launch.kernel.__name__,
                    tuple(sorted(launch.constexprs.items())),
                    ones,
                    launch.num_warps,
                    launch.num_stages,
                )
                entry = configs.setdefault(key, (launch, []))
                if geometry not in entry[1]:
                    entry[1].append(geometry)
    return configs


_SPILLS = re.compile(r'(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads')
_REGISTERS = re.compile(r'Used (\d+) registers')


def compile_launch(launch, target: int) -> Tuple[int, int, int, int, int]:
    """Compile `launch`'s kernel for compute capability `target` and run ptxas -v on its PTX: (registers,
    spill store bytes, spill load bytes, stack frame bytes, shared memory bytes)."""
    import triton
    from triton.backends.compiler import GPUTarget

    signature, constexprs, attrs, options = _specialisation(launch, target)
    source = triton.compiler.ASTSource(launch.kernel, signature, constexprs, attrs)
    compiled = triton.compile(source, target=GPUTarget('cuda', target, 32), options=options.__dict__)
    with tempfile.TemporaryDirectory() as folder:
        ptx = Path(folder) / 'kernel.ptx'
        ptx.write_text(compiled.asm['ptx'])
        done = subprocess.run(
            [
                str(ptxas_path(target)),
                '-v',
                '--regAllocOptLevel=2',
                f'--gpu-name={_arch(target)}',
                str(ptx),
                '-o',
                str(Path(folder) / 'kernel.cubin'),
            ],
            capture_output=True,
            text=True,
        )
    if done.returncode != 0:
        raise RuntimeError(f'ptxas failed for {launch.kernel.__name__} on sm_{target}: {done.stderr[-2000:]}')
    spills, registers = _SPILLS.search(done.stderr), _REGISTERS.search(done.stderr)
    if spills is None or registers is None:
        raise RuntimeError(f'ptxas -v printed no resource usage for {launch.kernel.__name__}: {done.stderr[-2000:]}')
    stack, stores, loads = (int(v) for v in spills.groups())
    return int(registers.group(1)), stores, loads, stack, int(compiled.metadata.shared)


def _config_text(launch) -> str:
    constexprs = ' '.join(f'{k}={int(v)}' for k, v in launch.constexprs.items())
    ones = ' '.join(f'{name}=1' for name, value in launch.scalars.items() if value == 1)
    return f'{constexprs} {ones}'.strip()


def kernel_report(
    geometries: Optional[Iterable[Geometry]] = None, targets: Optional[Iterable[int]] = None
) -> Tuple[List[KernelCompile], Dict[int, str]]:
    """Every distinct kernel configuration of `geometries` (default: the registered variants' and
    `EXTRA_GEOMETRIES`) compiled for every supported target: (results, {target: why skipped})."""
    geometries = list(geometries if geometries is not None else [*variant_geometries(), *EXTRA_GEOMETRIES])
    support = target_support(targets if targets is not None else SHARED_LIMITS)
    results = []
    for target in (t for t, why in support.items() if why is None):
        for launch, users in launch_configs(geometries).values():
            registers, stores, loads, stack, shared = compile_launch(launch, target)
            results.append(
                KernelCompile(
                    launch.kernel.__name__.strip('_'),
                    _config_text(launch),
                    target,
                    launch.num_warps,
                    registers,
                    stores,
                    loads,
                    stack,
                    shared,
                    SHARED_LIMITS[target],
                    users,
                )
            )
    return results, {t: why for t, why in support.items() if why is not None}


def format_report(results: Sequence[KernelCompile], skipped: Dict[int, str]) -> str:
    """A markdown table, one row per kernel configuration and target."""
    lines = [
        '| kernel | constexprs (and scalars specialised to 1) | target | warps | registers | spill stores / loads '
        '(bytes) | shared memory (bytes) / limit | layer shapes (K, stride, H, W, dilation) |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for r in results:
        shapes = ', '.join(f'{g.kernel_size}/{g.stride}/{g.height}x{g.width}/{g.dilation}' for g in r.geometries[:3])
        more = f' +{len(r.geometries) - 3}' if len(r.geometries) > 3 else ''
        lines.append(
            f'| {r.kernel} | {r.config} | sm_{r.target} | {r.num_warps} | {r.registers} | '
            f'{r.spill_stores} / {r.spill_loads} | {r.shared_bytes} / {r.shared_limit} | {shapes}{more} |'
        )
    for target, why in skipped.items():
        lines.append(f'\nsm_{target} not compiled: {why}.')
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m timm_tcnn.tools.kernel_report', description=__doc__.split('\n')[0])
    parser.add_argument('--json', type=Path, help='also write the report as JSON to this file')
    args = parser.parse_args(argv)
    import triton

    results, skipped = kernel_report()
    print(
        f'Triton {triton.__version__}; {len(results)} compilations; all within limits: {all(r.ok for r in results)}\n'
    )
    print(format_report(results, skipped))
    if args.json:
        from ..utils.io import atomic_write

        atomic_write(
            args.json,
            json.dumps(
                dict(
                    triton=triton.__version__,
                    skipped=skipped,
                    results=[dict(dataclasses.asdict(r), geometries=[list(g) for g in r.geometries]) for r in results],
                ),
                indent=1,
            ),
        )
    return 0 if all(r.ok for r in results) else 1


if __name__ == '__main__':
    sys.exit(main())
