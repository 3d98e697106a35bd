""" Converting a CNN's weights into its T-CNN: load the CNN, convert, check on inputs that both give the same
logits, save the T-CNN as a timm model folder (`model.safetensors` + `config.json`), all or nothing.

`convert_weights` does the work of `timm-tcnn convert`; the command parses and checks its options, calls it and
prints the `Conversion` it returns.
"""
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from timm.data import create_transform, resolve_data_config

from ..errors import InputError, WorkError
from ..models.convert import attention_layers
from ..utils.io import atomic_directory
from .identity import TOLERANCE, identity_error, load_converted
from .loading import create_model, load_cnn

__all__ = ['IdentityCheck', 'Conversion', 'check_pretrained_tag', 'random_cnn', 'convert_weights']


@dataclass(frozen=True)
class IdentityCheck:
    """One input batch of the identity check: max |T-CNN - CNN| / max |CNN| over its logits, and the share of
    equal top-1 predictions."""
    name: str
    max_relative_error: float
    top1_agreement: float


@dataclass
class Conversion:
    """What `convert_weights` did. `source` says where the CNN weights came from (`hf-hub:ID`, a checkpoint path,
    'random weights'); `classifier` says how the classifier was replaced, if it was; `seconds` holds the time to
    load, convert and verify; `out` is the written folder (None when nothing was asked to be written)."""
    cnn_name: str
    tcnn_name: str
    source: str
    weights_classes: int  # the class count of the CNN weights
    num_classes: int  # the T-CNN's
    options: Dict[str, Any]
    model_kwargs: Dict[str, Any]
    converted_layers: int
    cnn_parameters: int
    tcnn_parameters: int
    classifier: Optional[str] = None
    checks: List[IdentityCheck] = field(default_factory=list)
    seconds: Dict[str, float] = field(default_factory=dict)
    out: Optional[Path] = None

    @property
    def max_relative_error(self) -> float:
        return max((check.max_relative_error for check in self.checks), default=0.)


def check_pretrained_tag(cnn_name: str) -> None:
    """A pretrained tag in `cnn_name` (`arch.tag`) must be one of the CNN's."""
    arch, _, tag = cnn_name.partition('.')
    tags = [name.split('.', 1)[1] for name in timm.list_pretrained(f'{arch}.*')]
    if tag and tag not in tags:
        raise InputError(f'{arch} has no pretrained tag {tag!r}; its tags: {", ".join(tags)} (or leave the tag out '
                         f'for the default).')


@torch.no_grad()
def random_cnn(cnn_name: str, **kwargs: Any) -> nn.Module:
    """A random CNN in which every block contributes: no zero-initialised last BatchNorm, and running
    statistics measured on random images so that the activations stay well scaled."""
    cnn = create_model(cnn_name, **kwargs)
    norms = [m for m in cnn.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        if m.affine and not m.weight.any():
            nn.init.ones_(m.weight)  # zero-initialised last norm of a residual block
        m.momentum = None  # cumulative average over the calibration batch
    cnn.train()(torch.randn(4, *cnn.pretrained_cfg['input_size']))
    for m in norms:
        m.momentum = 0.1
    return cnn


def _load_images(files: Sequence[Path], model: nn.Module) -> Tuple[torch.Tensor, int]:
    """(N, 3, H, W) preprocessed with the model's eval transform, and the number of unreadable files."""
    from PIL import Image, UnidentifiedImageError
    transform = create_transform(**resolve_data_config(model=model))
    images, unreadable = [], 0
    for path in files:
        try:
            with Image.open(path) as image:
                images.append(transform(image.convert('RGB')))
        except (UnidentifiedImageError, OSError):
            unreadable += 1
    if not images:
        raise InputError(f'none of the {len(files)} image files could be read (the first: {files[0]}).')
    return torch.stack(images), unreadable


def _batches(model: nn.Module, batch_size: int, seed: int, images: Sequence[Path]) -> List[Tuple[str, torch.Tensor]]:
    """Named input batches: random at the train size, the test size and a non-square size; the images."""
    generator = torch.Generator().manual_seed(seed)
    cfg = model.pretrained_cfg
    train_h = cfg['input_size'][-1]
    test_h = cfg.get('test_input_size', cfg['input_size'])[-1]
    shapes = {f'random {train_h}x{train_h}': (train_h, train_h), f'random {test_h}x{test_h}': (test_h, test_h),
              f'random {train_h}x{test_h}': (train_h, test_h)}
    batches = [(name, torch.randn(batch_size, 3, h, w, generator=generator)) for name, (h, w) in shapes.items()]
    if images:
        x, unreadable = _load_images(images, model)
        skipped = f', {unreadable} unreadable skipped' if unreadable else ''
        batches.append((f'{len(x)} images{skipped}', x))
    return batches


def _load_source(tcnn_name: str, cnn_name: str, kwargs: Dict[str, Any], num_classes: Optional[int],
                 checkpoint: Optional[str], use_ema: bool, random_weights: bool, seed: int) -> Tuple[nn.Module, str]:
    """The CNN built with `kwargs` and its weights, and where they came from. Random weights get `num_classes`;
    loaded weights keep their classifier."""
    if checkpoint:
        refusal = (f'convert takes CNN weights. Load it as it is, e.g. timm.create_model("{tcnn_name.split(".")[0]}", '
                   f'checkpoint_path=...) or --checkpoint of analyze, robustness and publish.')
        return load_cnn(cnn_name.split('.')[0], checkpoint, use_ema, refusal=refusal, **kwargs), checkpoint
    if random_weights:
        torch.manual_seed(seed)
        classes = {} if num_classes is None else {'num_classes': num_classes}
        return random_cnn(cnn_name, **kwargs, **classes), 'random weights'
    hf_hub_id = timm.models.get_pretrained_cfg(cnn_name).hf_hub_id
    return load_cnn(cnn_name, **kwargs), f'hf-hub:{hf_hub_id}'


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def convert_weights(
        tcnn_name: str,
        cnn_name: str,
        options: Dict[str, Any],
        model_kwargs: Dict[str, Any],
        num_classes: Optional[int] = None,
        checkpoint: Optional[str] = None,
        use_ema: bool = False,
        random_weights: bool = False,
        images: Sequence[Path] = (),
        batch_size: int = 2,
        tolerance: float = TOLERANCE,
        seed: int = 0,
        out: Optional[str] = None,
        overwrite: bool = False,
        on_check: Optional[Callable[[IdentityCheck], None]] = None,
) -> Conversion:
    """Convert the CNN `cnn_name` (`arch[.tag]`) into the T-CNN `tcnn_name` with its T-CNN `options` (`tcnn_*`) and
    the other `create_model` arguments `model_kwargs`, check the identity, and write the T-CNN to `out`.

    The CNN weights come from `checkpoint` (its EMA weights with `use_ema`), are random (`random_weights`, drawn with
    `seed`), or else are timm's pretrained weights from the Hub or its cache. A `num_classes` other than the
    weights' replaces the classifier by a random one (drawn with `seed`), the same in the CNN and the T-CNN. The
    identity is checked on random inputs (`batch_size` each, drawn with `seed`) at the train, test and a non-square
    size, and on the image files `images` (unreadable ones skipped and counted); `on_check` receives each result as
    it comes. When the max relative error exceeds `tolerance` a `WorkError` is raised and nothing is written; else
    `out`, if given, is written all or nothing (replaced only with `overwrite`) and loads with
    `timm.create_model('local-dir:OUT')` after `import timm_tcnn`.
    """
    start = time.perf_counter()
    cnn, source = _load_source(tcnn_name, cnn_name, model_kwargs, num_classes, checkpoint, use_ema, random_weights,
                               seed)
    label = f'CNN checkpoint {Path(source).name}' if checkpoint else source
    weights_classes = cnn.num_classes
    num_classes = weights_classes if num_classes is None else num_classes
    classifier = None
    if num_classes != weights_classes:
        classifier = (f'its {weights_classes}-class classifier replaced by a random {num_classes}-class one '
                      f'(seed {seed})')
        torch.manual_seed(seed)
        cnn.reset_classifier(num_classes)
    # timm's own pretrained cfg only for its weights as they are
    note = label if classifier is None else f'{label}, {classifier}'
    overlay = {} if source.startswith('hf-hub:') and classifier is None else dict(
        hf_hub_id=None, tag='converted', notes=(f'T-CNN converted from {note} by timm-tcnn convert.',))
    load_seconds = time.perf_counter() - start

    start = time.perf_counter()
    tcnn = create_model(tcnn_name, num_classes=num_classes, pretrained_cfg_overlay=overlay, **model_kwargs, **options)
    load_converted(tcnn, cnn)
    convert_seconds = time.perf_counter() - start
    cnn.eval()
    tcnn.eval()
    result = Conversion(
        cnn_name=cnn_name, tcnn_name=tcnn_name, source=source, weights_classes=weights_classes,
        num_classes=num_classes, options=options, model_kwargs=model_kwargs,
        converted_layers=len(list(attention_layers(tcnn))), cnn_parameters=_count(cnn), tcnn_parameters=_count(tcnn),
        classifier=classifier)

    start = time.perf_counter()
    for name, x in _batches(tcnn, batch_size, seed, images):
        check = IdentityCheck(name, *identity_error(cnn, tcnn, x))
        result.checks.append(check)
        if on_check is not None:
            on_check(check)
    result.seconds = dict(load=load_seconds, convert=convert_seconds, verify=time.perf_counter() - start)

    worst = result.max_relative_error
    if not worst <= tolerance:
        raise WorkError(f'the identity does not hold: max relative error {worst:.2e} > tolerance {tolerance:.0e}; '
                        f'nothing was written. Report it with the command line used.')
    if out:
        with atomic_directory(out, overwrite=overwrite) as tmp:
            timm.models.save_for_hf(tcnn, str(tmp), model_args={**model_kwargs, **options}, safe_serialization=True)
        result.out = Path(out)
    return result
