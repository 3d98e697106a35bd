""" The positional kernels compiled ahead of time for GPU targets, on any machine (no GPU, no CUDA driver needed).

For every Triton kernel of `layers.positional_kernels`, at the launches the converted layers of the registered
variants make (`kernel_launches` of each layer's geometry, found by a forward pass on the meta device at the
variant's pretrained train and test image sizes, at output stride 32 and at the dilated output strides 16 and 8 of
dense prediction), the kernel Triton's JIT would build for that launch (its own binding and specialisation of the
arguments: constexprs, integers equal to 1, integers and pointers divisible by 16) is compiled for each target
(sm_80, sm_90, and sm_100 where the bundled ptxas knows it). The bundled ptxas, run with the options Triton runs it
with, reports registers per thread and spills; shared memory is the compiled kernel's (Triton's dynamic allocation
plus any static), against the target's per-block limit.

Launches that Triton specialises alike compile to the same kernel, so each distinct specialisation is compiled once.

    python -m timm_tcnn.tools.kernel_report     # the markdown summary per kernel and target
"""
import dataclasses
import functools
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

__all__ = [
    'SHARED_LIMITS', 'MAX_REGISTERS', 'TARGETS', 'OUTPUT_STRIDES', 'KernelConfig', 'KernelCompile', 'ptxas_path',
    'target_support', 'variant_geometries', 'launch_configs', 'compile_config', 'kernel_report', 'summary',
    'format_summary', 'format_rows', 'main',
]

# the most shared memory one block may use (the opt-in maximum; 1 KB of each SM's is reserved per block), bytes, as
# NVIDIA's CUTLASS records it (python/CuTeDSL cutlass/utils/smem_capacity.py, include/cutlass/arch/arch.h) and the
# tuning guides state it: sm_80 163 KB, sm_86/89/120 99 KB, sm_90/100 227 KB
SHARED_LIMITS: Dict[int, int] = {
    80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024,
}
MAX_REGISTERS = 255  # per thread, every target since sm_35
TARGETS = (80, 90, 100)  # A100, H100/H200, B200
OUTPUT_STRIDES = (32, 16, 8)  # 16 and 8: timm's dilated last stages, as dense-prediction backbones build them
_UNKNOWN_ARCH = re.compile(r"Value '(sm_\w+)' is not defined for option 'gpu-name'")


class KernelConfig(NamedTuple):
    """One distinct compilation: a launch standing for all that Triton specialises alike, its specialisation
    (`triton.compile`'s signature, constexprs and attributes, and options) and the layer geometries using it."""
    launch: object  # positional_kernels.Launch
    signature: dict
    constexprs: dict
    attrs: dict
    options: object
    specialised: str  # the scalars Triton specialised, in words
    geometries: List[object]  # positional_kernels.KernelPositional


@dataclasses.dataclass
class KernelCompile:
    """One kernel configuration compiled for one target, and what ptxas reports for it."""

    kernel: str
    target: int
    config: str
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int
    shared_limit: int
    geometries: List[Tuple]

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


@functools.lru_cache(maxsize=None)
def _variant_geometries(output_strides: Tuple[int, ...]) -> Tuple:
    import timm

    from ..layers.positional_kernels import KernelPositional
    from ..models.convert import attention_layers
    from ..models.variants import VARIANTS

    found = {}
    for name in VARIANTS:
        for output_stride in output_strides:
            kwargs = {} if output_stride == 32 else dict(output_stride=output_stride)
            try:
                with torch.device('meta'):
                    model = timm.create_model(name, pretrained=False, **kwargs).eval()
            except TypeError as e:  # a family without output_stride (MobileNetV3): nothing dilated to build
                if 'output_stride' not in str(e):
                    raise
                continue
            cfg = model.pretrained_cfg
            sizes = {tuple(cfg['input_size'][1:]), tuple((cfg.get('test_input_size') or cfg['input_size'])[1:])}

            def record(layer, args):
                # the geometry the layer's training forward gives the kernels (`_positional_builder`)
                height, width = args[0].shape[-2:]
                geometry = KernelPositional(layer.kernel_size, layer.stride, height, width,
                                            layer.query_start(height, width), layer.dilation)
                found.setdefault(geometry, set()).add(name)

            handles = [layer.register_forward_pre_hook(record) for _, layer in attention_layers(model)]
            try:
                for size in sorted(sizes):
                    with torch.enable_grad():  # the attention computation, never an inference shortcut
                        model(torch.empty(1, 3, *size, device='meta'))
            finally:
                for handle in handles:
                    handle.remove()
    return tuple(sorted(found))


def variant_geometries(output_strides: Sequence[int] = OUTPUT_STRIDES) -> Tuple:
    """The `KernelPositional` geometries of every converted layer of every registered variant (at its pretrained
    config's train and test image sizes, at each of `output_strides` the variant's family takes), found by forward
    passes on the meta device with the layer's own `query_start`; computed once per process."""
    return _variant_geometries(tuple(output_strides))


def _specialisation(launch, target: int):
    """(signature, constexprs, attrs, options, specialisation) of the kernel the JIT builds for `launch` on
    `target`: Triton's own binding and specialisation of its arguments (fresh float32 tensors stand in for the
    pointers: 16-byte aligned, as the layers' freshly allocated tensors are)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(GPUTarget('cuda', target, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    pointers = [torch.empty(4) for name in fn.arg_names if name.endswith('_ptr')]
    kwargs = dict(num_warps=launch.num_warps, num_stages=launch.num_stages)
    bound, specialisation, options = binder(*pointers, **launch.scalars, **launch.constexprs, **kwargs)
    packed = fn._pack_args(backend, kwargs, bound, specialisation, options)
    return (*packed[1:], packed[0], specialisation)


def _specialised_text(launch, specialisation) -> str:
    """The runtime scalars Triton specialised: those equal to 1 (compiled as constants), those divisible by 16."""
    ones, sixteens = [], []
    for name, (kind, value) in zip(launch.kernel.arg_names, specialisation):
        if name not in launch.scalars:
            continue
        if kind == 'constexpr':
            ones.append(name)
        elif value == 'D':
            sixteens.append(name)
    words = [f'{"=".join(ones)}=1' if ones else '', f'multiple of 16: {" ".join(sixteens)}' if sixteens else '']
    return '; '.join(w for w in words if w)


def launch_configs(geometries: Iterable, target: int) -> Dict[Tuple, KernelConfig]:
    """The distinct compilations of the layers' launches on `target`: keyed as Triton's JIT caches its kernels
    (kernel, specialisation of every argument, warps, stages), both backward variants (with and without the
    content's gate gradient) included."""
    from ..layers.positional_kernels import kernel_launches

    configs: Dict[Tuple, KernelConfig] = {}
    for geometry in geometries:
        for has_content in (False, True):
            for launch in kernel_launches(geometry, has_content).values():
                signature, constexprs, attrs, options, specialisation = _specialisation(launch, target)
                key = (launch.kernel.__name__, tuple(specialisation), launch.num_warps, launch.num_stages)
                if key not in configs:
                    configs[key] = KernelConfig(launch, signature, constexprs, attrs, options,
                                                _specialised_text(launch, specialisation), [])
                if geometry not in configs[key].geometries:
                    configs[key].geometries.append(geometry)
    return configs


_SPILLS = re.compile(r'(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads')
_REGISTERS = re.compile(r'Used (\d+) registers')
_STATIC_SHARED = re.compile(r'(\d+) bytes smem')


def compile_config(config: KernelConfig, target: int) -> Tuple[int, int, int, int, int]:
    """Compile `config` for compute capability `target` and run the bundled ptxas -v on its PTX, with the options
    Triton's backend passes it: (registers, spill store bytes, spill load bytes, stack frame bytes, shared memory
    bytes). Raises `triton.runtime.errors.PTXASError` where ptxas fails (Triton's own cubin step)."""
    import triton
    from triton.backends.compiler import GPUTarget

    source = triton.compiler.ASTSource(config.launch.kernel, config.signature, config.constexprs, config.attrs)
    compiled = triton.compile(source, target=GPUTarget('cuda', target, 32), options=config.options.__dict__)
    name = config.launch.kernel.__name__
    with tempfile.TemporaryDirectory() as folder:
        ptx = Path(folder) / 'kernel.ptx'
        ptx.write_text(compiled.asm['ptx'])
        fmad = [] if config.options.enable_fp_fusion else ['--fmad=false']
        command = [str(ptxas_path(target)), '-lineinfo', *fmad, '-v', '--regAllocOptLevel=2',
                   f'--gpu-name={_arch(target)}', str(ptx), '-o', str(Path(folder) / 'kernel.cubin')]
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f'ptxas failed for {name} on sm_{target}: {done.stderr[-2000:]}')
    spills, registers = _SPILLS.search(done.stderr), _REGISTERS.search(done.stderr)
    if spills is None or registers is None:
        raise RuntimeError(f'ptxas -v printed no resource usage for {name}: {done.stderr[-2000:]}')
    static = _STATIC_SHARED.search(done.stderr)
    stack, stores, loads = (int(v) for v in spills.groups())
    shared = int(compiled.metadata.shared) + (int(static.group(1)) if static else 0)
    return int(registers.group(1)), stores, loads, stack, shared


@functools.lru_cache(maxsize=None)
def target_support(target: int) -> Optional[str]:
    """None where Triton and its bundled ptxas compile for compute capability `target`, else why not: no ptxas, or
    ptxas does not know the architecture (its own error, found by compiling the smallest kernel)."""
    from triton.runtime.errors import PTXASError

    from ..layers.positional_kernels import KernelPositional, kernel_launches

    ptxas = ptxas_path(target)
    if ptxas is None:
        return f'no ptxas for sm_{target} in the Triton installation'
    launch = kernel_launches(KernelPositional(3, 1, 1, 1, (0, 0)), False)['positional_values_grad']
    config = KernelConfig(launch, *_specialisation(launch, target)[:4], '', [])
    try:
        compile_config(config, target)
    except (PTXASError, RuntimeError) as e:
        unknown = _UNKNOWN_ARCH.search(str(e))
        if unknown is None:
            raise
        return f'{ptxas.name} does not know {unknown.group(1)}'
    return None


def kernel_report(
    geometries: Optional[Iterable] = None,
    targets: Iterable[int] = TARGETS,
    shared_limits: Optional[Mapping[int, int]] = None,
) -> Tuple[List[KernelCompile], Dict[int, str]]:
    """Every distinct kernel configuration of `geometries` (default: the registered variants', `variant_geometries`)
    compiled for every target the bundled ptxas supports: (rows, {target: why not compiled}). `shared_limits`
    adds or overrides per-block shared memory limits (a target outside `SHARED_LIMITS` needs one)."""
    geometries = list(variant_geometries() if geometries is None else geometries)
    limits = {**SHARED_LIMITS, **(shared_limits or {})}
    rows, skipped = [], {}
    for target in targets:
        why = target_support(target)
        if why is not None:
            skipped[target] = why
            continue
        for config in launch_configs(geometries, target).values():
            registers, stores, loads, stack, shared = compile_config(config, target)
            launch = config.launch
            constexprs = ' '.join(f'{k}={int(v)}' for k, v in launch.constexprs.items())
            rows.append(KernelCompile(
                launch.kernel.__name__.strip('_'), target, '; '.join(filter(None, [constexprs, config.specialised])),
                launch.num_warps, launch.num_stages, registers, stores, loads, stack, shared, limits[target],
                [(g.kernel_size, g.stride, g.height, g.width, g.dilation) for g in config.geometries],
            ))
    return rows, skipped


def summary(rows: Sequence[KernelCompile]) -> List[Dict]:
    """Per kernel and target: configurations, registers (fewest, most), most spill bytes stored and loaded, most
    shared memory, the limit, and whether every configuration is within the limits."""
    groups: Dict[Tuple[str, int], List[KernelCompile]] = {}
    for row in rows:
        groups.setdefault((row.kernel, row.target), []).append(row)
    return [
        dict(kernel=kernel, target=target, configs=len(group), warps=sorted({r.num_warps for r in group}),
             registers=(min(r.registers for r in group), max(r.registers for r in group)),
             spill_stores=max(r.spill_stores for r in group), spill_loads=max(r.spill_loads for r in group),
             shared_bytes=max(r.shared_bytes for r in group), shared_limit=group[0].shared_limit,
             ok=all(r.ok for r in group))
        for (kernel, target), group in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0]))
    ]


def format_summary(rows: Sequence[KernelCompile], skipped: Mapping[int, str]) -> str:
    """A markdown table, one row per kernel and target."""
    lines = [
        '| kernel | target | configurations | warps | registers per thread (limit 255) | spill stores / loads '
        '(bytes) | shared memory (bytes) / limit | within limits |',
        '|---|---|---:|---:|---:|---:|---:|---|',
    ]
    for s in summary(rows):
        low, high = s['registers']
        lines.append(
            f"| {s['kernel']} | sm_{s['target']} | {s['configs']} | {'/'.join(map(str, s['warps']))} | "
            f"{low if low == high else f'{low}-{high}'} | {s['spill_stores']} / {s['spill_loads']} | "
            f"{s['shared_bytes']} / {s['shared_limit']} | {'yes' if s['ok'] else '**no**'} |"
        )
    for target, why in skipped.items():
        lines.append(f'\nsm_{target} not compiled: {why}.')
    return '\n'.join(lines)


def format_rows(rows: Sequence[KernelCompile]) -> str:
    """A markdown table, one row per kernel configuration and target."""
    lines = [
        '| kernel | target | constexprs; scalars Triton specialised | registers | spill stores / loads | shared '
        '(bytes) | layer shapes (K, stride, H, W, dilation) |',
        '|---|---|---|---:|---:|---:|---|',
    ]
    for r in rows:
        shapes = ', '.join('/'.join(map(str, g[:2])) + f'/{g[2]}x{g[3]}/{g[4]}' for g in r.geometries[:3])
        more = f' +{len(r.geometries) - 3}' if len(r.geometries) > 3 else ''
        lines.append(f'| {r.kernel} | sm_{r.target} | {r.config} | {r.registers} | {r.spill_stores} / '
                     f'{r.spill_loads} | {r.shared_bytes} | {shapes}{more} |')
    return '\n'.join(lines)


def main() -> int:
    """Print the report (summary, then every configuration); exit status 1 where a kernel is outside a limit."""
    import triton

    rows, skipped = kernel_report()
    print(f'Triton {triton.__version__}; {len(rows)} compilations; within limits: {all(r.ok for r in rows)}\n')
    print(format_summary(rows, skipped), end='\n\n')
    print(format_rows(rows))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == '__main__':
    raise SystemExit(main())
