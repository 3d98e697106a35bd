""" The `scratch` arm: what the starting CNN's own training run tells (epochs, recipe, time), and the recipe of the
T-CNN trained from scratch the same way. """
from pathlib import Path
from typing import Any, Dict, Optional

import yaml

from ...errors import InputError
from ...utils.io import atomic_write, read_mapping
from ...weights.checkpoint import checkpoint_epochs
from .spec import ExperimentSpec, ScratchArm, Step

__all__ = ['RUN_OPTIONS', 'scratch_arm', 'scratch_recipe_step']

# train.py options of one run, not of its recipe: the experiment sets them per arm and seed, or they point at the
# CNN's own run (its weights, output and data)
RUN_OPTIONS = (
    'data_dir', 'data', 'train_split', 'val_split', 'model', 'model_kwargs', 'pretrained', 'pretrained_path',
    'initial_checkpoint', 'resume', 'no_resume_opt', 'start_epoch', 'output', 'experiment', 'seed', 'epochs',
    'device', 'num_classes', 'img_size', 'input_size', 'checkpoint_hist',
)


def _run_seconds(checkpoint: Path, recipe: Path) -> Optional[float]:
    """A train.py run's wall clock up to `checkpoint`: from its args.yaml (written at the start) to the checkpoint."""
    seconds = checkpoint.stat().st_mtime - recipe.stat().st_mtime
    return round(seconds, 1) if seconds > 0 else None


def scratch_arm(cnn_checkpoint: Optional[str], finetune_epochs: int, num_classes: int,
                cnn_epochs: Optional[int] = None, recipe: Optional[str] = None) -> ScratchArm:
    """The scratch arm of an experiment starting from `cnn_checkpoint`. Its epochs and recipe are read from the
    checkpoint (train.py's `epoch` entry) and its run folder (`args.yaml` beside it) unless given; so is the CNN's
    training time (from the folder's file times), counted for the `tcnn` route."""
    checkpoint = Path(cnn_checkpoint) if cnn_checkpoint else None
    args_yaml = checkpoint.parent / 'args.yaml' if checkpoint else None
    start = cnn_checkpoint or "timm's pretrained weights"
    epochs = cnn_epochs or (checkpoint_epochs(checkpoint) if checkpoint else None)
    if epochs is None:
        raise InputError(f"--arms scratch trains the T-CNN for the starting CNN's epochs plus the fine-tune's, but "
                         f'{start} does not record its epochs: pass --cnn-epochs N.')
    if recipe is None:
        if args_yaml is None or not args_yaml.is_file():
            raise InputError(f"--arms scratch trains the T-CNN with the starting CNN's recipe, but {start} has no "
                             f"args.yaml beside it: pass the CNN's train.py recipe with --scratch-config YAML.")
        recipe = str(args_yaml)
    read_mapping(recipe, '--scratch-config recipe')
    seconds = _run_seconds(checkpoint, args_yaml) if args_yaml is not None and args_yaml.is_file() else None
    return ScratchArm(recipe_source=str(Path(recipe).resolve()), cnn_epochs=epochs, finetune_epochs=finetune_epochs,
                      num_classes=num_classes, cnn_seconds=seconds)


def scratch_recipe_step(spec: ExperimentSpec, step: Step) -> Dict[str, Any]:
    """In-process experiment step: the scratch arm's recipe, the starting CNN's without the options of its own run
    (`RUN_OPTIONS`), which the experiment sets."""
    recipe = read_mapping(spec.scratch.recipe_source, 'the scratch arm\'s recipe')
    dropped = sorted(k for k in recipe if k in RUN_OPTIONS)
    kept = {k: v for k, v in recipe.items() if k not in RUN_OPTIONS}
    header = (f'# the scratch arm\'s train.py recipe: {spec.scratch.recipe_source}\n'
              f'# without the options of that run: {", ".join(dropped) or "none"}\n')
    atomic_write(step.result, header + yaml.safe_dump(kept, sort_keys=True))
    return dict(passed=True)
