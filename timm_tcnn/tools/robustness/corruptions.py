""" ImageNet-C corruptions applied on the fly with the `imagecorruptions` package.

The rendering follows how ImageNet-C was made: resize the shorter side to `size * 256 / 224`
(bilinear), centre-crop `size` x `size`, then corrupt. Severity 0 means the rendered clean image.
Every image gets its own seed (from the run seed, the corruption, the severity and the image
index), so reruns and DataLoader workers give identical images.
"""
import inspect
import zlib
from types import ModuleType
from typing import Sequence

import numpy as np
from PIL import Image
from torchvision import transforms

from ...errors import InputError

__all__ = ['import_imagecorruptions', 'check_corruptions', 'CorruptImage']

_INSTALL_HINT = (
    'Install the maintained fork, which keeps the same `imagecorruptions` module and API: '
    '`pip uninstall -y imagecorruptions && pip install imagecorruptions-imaug` '
    "(or `pip install 'timm-tcnn[robustness]'`)."
)


def import_imagecorruptions() -> ModuleType:
    """The `imagecorruptions` module; a clear error if the package is missing or broken."""
    try:
        import imagecorruptions
    except ImportError as e:
        raise InputError(f'--corrupt needs the imagecorruptions package, which failed to import ({e}). '
                           f'{_INSTALL_HINT}') from e
    return imagecorruptions


def check_corruptions(names: Sequence[str], severities: Sequence[int]) -> None:
    """Run every requested corruption once on a small image, so that a broken install fails before evaluation."""
    available = import_imagecorruptions().get_corruption_names('all')
    unknown = [n for n in names if n not in available]
    if unknown:
        raise InputError(f'unknown corruption(s) {", ".join(unknown)}; available: {", ".join(available)}')
    probe = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for name in names:
        for severity in severities:
            try:
                CorruptImage(name, severity, size=64)(probe, 0)
            except Exception as e:
                raise InputError(f'imagecorruptions failed on {name} severity {severity}: '
                                   f'{type(e).__name__}: {e}. {_INSTALL_HINT}') from e


class CorruptImage:
    """PIL image -> rendered (size x size) and corrupted PIL image; callable as (image, index).

    Args:
        name: imagecorruptions corruption name (e.g. 'gaussian_noise').
        severity: 1..5, or 0 for the clean rendered image.
        size: side of the rendered square image (ImageNet-C: 224).
        seed: run seed; the per-image seed also depends on name, severity and index.
    """

    def __init__(self, name: str, severity: int, size: int = 224, seed: int = 0):
        if severity not in range(6):
            raise ValueError(f'severity must be 0 (clean) to 5, got {severity}')
        self.name = name
        self.severity = severity
        self.seed = seed
        self.render = transforms.Compose([
            transforms.Resize(round(size * 256 / 224), interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(size),
        ])

    def _image_seed(self, index: int) -> int:
        key = f'{self.seed}/{self.name}/{self.severity}/{index}'.encode()
        return zlib.crc32(key)

    def __call__(self, image: Image.Image, index: int) -> Image.Image:
        image = self.render(image)
        if self.severity == 0:
            return image
        package = import_imagecorruptions()
        seed = self._image_seed(index)
        np.random.seed(seed)  # most corruptions draw from numpy's global generator
        # corruptions with their own generator take a `seed` argument (imagecorruptions-imaug)
        takes_seed = 'seed' in inspect.signature(package.corruption_dict[self.name]).parameters
        out = package.corrupt(np.asarray(image), severity=self.severity, corruption_name=self.name,
                              **({'seed': seed} if takes_seed else {}))
        return Image.fromarray(out)
