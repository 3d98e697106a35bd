""" The train.py recipes shipped with the package (`recipes/*.yaml`, package data). """
from importlib import resources
from pathlib import Path
from typing import List

__all__ = ['DEFAULT_RECIPE', 'recipe_names', 'recipe_path']

DEFAULT_RECIPE = 'tcnn_resnet50rs_in1k_ft50.yaml'  # ResNet50-RS, ImageNet-1k, 50 epochs (docs/training.md)


def recipe_names() -> List[str]:
    """File names of the shipped recipes."""
    return sorted(
        p.name for p in resources.files(__package__).joinpath('recipes').iterdir() if p.name.endswith('.yaml')
    )


def recipe_path(name: str = DEFAULT_RECIPE) -> Path:
    """The file of a shipped recipe, a path train.py's `--config` reads (the package is installed as files)."""
    return Path(str(resources.files(__package__).joinpath('recipes', name)))
