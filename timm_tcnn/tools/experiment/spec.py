""" What a T-CNN vs CNN experiment runs: its specification and the command line of every step.

Each training arm is one run of timm's train.py per seed, with the same seed and data:

- arm `tcnn`: the T-CNN, initialised from the CNN weights (converted on load);
- arm `cnn`: the CNN itself, fine-tuned identically (the control);
- arm `scratch` (optional): the T-CNN from its own initialisation, trained with the starting CNN's recipe for the
  CNN's epochs plus the fine-tune's, so that it and the `tcnn` route (CNN, then T-CNN) train for as many epochs.

In a transfer (a class count other than the starting weights'), both arms of a seed start from the same
file: the CNN with its classifier replaced by a new random one drawn with the seed (step `start/seedS`).

Then, per arm and seed: validate.py on the best and last checkpoints at the train and test sizes, the
robustness command (both arms in one run, on the same corrupted images), and `analyze` of the T-CNN at
conversion and at the end. Every step is a command line, so `--dry-run` can print them all and a rerun
can tell finished steps with the same arguments from changed ones.
"""
import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

__all__ = [
    'ARMS',
    'DEFAULT_ARMS',
    'ExperimentSpec',
    'ScratchArm',
    'Step',
    'analyze_argv',
    'build_steps',
    'run_name',
    'task_argv',
]

ARMS = ('tcnn', 'cnn', 'scratch')
DEFAULT_ARMS = ('tcnn', 'cnn')
TCNN_ARMS = ('tcnn', 'scratch')  # arms whose model is the T-CNN
CHECKPOINTS = ('best', 'last')
CHECKPOINT_FILES = {'best': 'model_best.pth.tar', 'last': 'last.pth.tar'}


@dataclass(frozen=True)
class ScratchArm:
    """The `scratch` arm: the T-CNN trained from its own initialisation with the starting CNN's recipe, for the
    CNN's epochs plus the fine-tune's."""

    recipe_source: str  # the starting CNN's train.py recipe (its args.yaml, or --scratch-config)
    cnn_epochs: int  # epochs the starting CNN was trained for
    finetune_epochs: int  # epochs of the tcnn and cnn arms
    num_classes: int
    cnn_seconds: Optional[float] = None  # the starting CNN's training time, where its run folder tells it

    @property
    def epochs(self) -> int:
        return self.cnn_epochs + self.finetune_epochs


@dataclass(frozen=True)
class ExperimentSpec:
    """Everything that defines an experiment's results (and so must match when a folder is resumed)."""

    model: str  # the T-CNN, e.g. tcnn_resnet50rs
    cnn_model: str  # its CNN, e.g. resnetrs50
    data_dir: str
    out: str
    recipe: str  # train.py --config YAML
    recipe_sha256: str
    scripts_dir: str  # folder holding timm's train.py and validate.py
    seeds: Tuple[int, ...]
    epochs: Optional[int] = None  # None: the recipe's
    nproc: int = 1
    cnn_checkpoint: Optional[str] = None  # None: timm's pretrained weights of cnn_model
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # both arms (and the CNN checkpoint)
    tcnn_kwargs: Dict[str, Any] = field(default_factory=dict)  # the T-CNN arm only (tcnn_* options)
    num_classes: Optional[int] = None
    train_size: int = 224
    test_size: int = 224
    train_split: str = 'train'
    val_split: str = 'validation'
    train_args: Tuple[str, ...] = ()  # passed through to train.py
    device: str = 'cpu'
    workers: int = 2
    eval_batch_size: int = 64
    corruptions: Tuple[str, ...] = ()
    severities: Tuple[int, ...] = ()
    imagenet_c: Optional[str] = None
    imagenet_a: Optional[str] = None
    imagenet_r: Optional[str] = None
    analyze_images: int = 32
    arms: Tuple[str, ...] = DEFAULT_ARMS
    scratch: Optional[ScratchArm] = None

    def fingerprint(self) -> str:
        """Hash of every field that changes the `tcnn` and `cnn` arms' results. Seeds and arms can be added to a
        folder; the scratch arm's own settings are in its steps' command lines, which a rerun compares."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ('seeds', 'out', 'arms', 'scratch')}
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def model_name(self, arm: str) -> str:
        return self.model if arm in TCNN_ARMS else self.cnn_model

    def arm_kwargs(self, arm: str) -> Dict[str, Any]:
        """`create_model` arguments of an arm (without the class count)."""
        return {**self.model_kwargs, **(self.tcnn_kwargs if arm in TCNN_ARMS else {})}

    def num_classes_of(self, arm: str) -> Optional[int]:
        """The class count passed to train.py and validate.py for `arm` (None: the starting weights')."""
        return self.scratch.num_classes if arm == 'scratch' else self.num_classes

    def eval_kwargs(self, arm: str) -> Dict[str, Any]:
        """`create_model` arguments that rebuild an arm's train.py checkpoints."""
        classes = self.num_classes_of(arm)
        return {**self.arm_kwargs(arm), **({} if classes is None else {'num_classes': classes})}

    @property
    def root(self) -> Path:
        return Path(self.out)

    def run_dir(self, arm: str, seed: int) -> Path:
        return self.root / 'train' / run_name(arm, seed)

    def checkpoint(self, arm: str, seed: int, which: str) -> Path:
        return self.run_dir(arm, seed) / CHECKPOINT_FILES[which]

    def epoch_weights(self, arm: str, seed: int) -> Path:
        """Folder of a run's weights after every epoch (`epoch<N>.safetensors`, recorded while it trains)."""
        return self.root / 'epochs' / run_name(arm, seed)

    def predictions(self, arm: Optional[str], seed: Optional[int]) -> Path:
        """Every validation image's prediction by a run (by the starting CNN for arm None)."""
        return self.root / 'predictions' / (f'{run_name(arm, seed)}.json' if arm else 'start.json')

    @property
    def scratch_recipe(self) -> Path:
        """The scratch arm's train.py recipe: the starting CNN's, without the options of its own run."""
        return self.root / 'scratch' / 'recipe.yaml'

    def start_checkpoint(self, seed: int) -> Path:
        """In a transfer, the CNN both arms of `seed` start from (its classifier replaced)."""
        return self.root / 'start' / f'seed{seed}.safetensors'


@dataclass(frozen=True)
class Step:
    """One step: `argv` runs it (a subprocess), unless `kind` is done in process (identity, report)."""

    key: str  # e.g. 'train/tcnn/seed0'
    kind: str  # identity | train | validate | robustness | analyze
    argv: Tuple[str, ...]
    needs: Tuple[str, ...] = ()  # keys of steps that must have succeeded first
    arm: Optional[str] = None
    seed: Optional[int] = None
    result: Optional[str] = None  # file the step writes its result to


def run_name(arm: str, seed: int) -> str:
    return f'{arm}-seed{seed}'


def _kwargs_args(kwargs: Dict[str, Any]) -> List[str]:
    """`--model-kwargs k=v ...` as timm's scripts parse it (ast.literal_eval of each value)."""
    return ['--model-kwargs', *(f'{k}={v!r}' for k, v in kwargs.items())] if kwargs else []


def _timm_tcnn(*args: str) -> Tuple[str, ...]:
    return (sys.executable, '-m', 'timm_tcnn', *args)


def _train_step(spec: ExperimentSpec, arm: str, seed: int, transfer: bool) -> Step:
    script = str(Path(spec.scripts_dir) / 'train.py')
    launcher = (
        _timm_tcnn('run', script)
        if spec.nproc == 1
        else ('torchrun', f'--nproc_per_node={spec.nproc}', '-m', 'timm_tcnn', 'run', script)
    )
    if arm == 'scratch':
        recipe, weights, epochs = str(spec.scratch_recipe), [], spec.scratch.epochs
    else:
        start = str(spec.start_checkpoint(seed)) if transfer else spec.cnn_checkpoint
        recipe, weights, epochs = (
            spec.recipe,
            ['--initial-checkpoint', start] if start else ['--pretrained'],
            spec.epochs,
        )
    argv = [
        *launcher,
        '--config',
        recipe,
        '--data-dir',
        spec.data_dir,
        '--train-split',
        spec.train_split,
        '--val-split',
        spec.val_split,
        '--model',
        spec.model_name(arm),
        *weights,
        *_kwargs_args(spec.arm_kwargs(arm)),
        '--seed',
        str(seed),
        '--output',
        str(spec.root / 'train'),
        '--experiment',
        run_name(arm, seed),
        '--checkpoint-hist',
        '1',
        '--device',
        spec.device,
        '--img-size',
        str(spec.train_size),
    ]
    if spec.num_classes_of(arm) is not None:
        argv += ['--num-classes', str(spec.num_classes_of(arm))]
    if epochs is not None:
        argv += ['--epochs', str(epochs)]
    argv += list(spec.train_args)
    if arm == 'scratch':
        needs = ('identity', 'scratch/recipe')
    else:
        needs = ('identity', f'start/seed{seed}') if transfer else ('identity',)
    return Step(
        f'train/{arm}/seed{seed}', 'train', tuple(argv), needs, arm, seed, str(spec.run_dir(arm, seed) / 'summary.csv')
    )


def task_argv(step: Step) -> Tuple[str, ...]:
    """A training step's command as one of the processes SLURM starts (srun tasks, ranks from `SLURM_PROCID`): train.py
    itself in place of torchrun, which starts them on one machine."""
    if step.argv[0] != 'torchrun':
        return step.argv
    return (*_timm_tcnn(), *step.argv[4:])  # after 'torchrun --nproc_per_node=N -m timm_tcnn'


def _validate_step(spec: ExperimentSpec, arm: str, seed: int, which: str, size: int) -> Step:
    result = spec.root / 'validate' / f'{run_name(arm, seed)}-{which}-{size}px.json'
    argv = [
        *_timm_tcnn('run', str(Path(spec.scripts_dir) / 'validate.py')),
        '--data-dir',
        spec.data_dir,
        '--split',
        spec.val_split,
        '--model',
        spec.model_name(arm),
        '--checkpoint',
        str(spec.checkpoint(arm, seed, which)),
        *_kwargs_args(spec.arm_kwargs(arm)),
        '--img-size',
        str(size),
        '--batch-size',
        str(spec.eval_batch_size),
        '--workers',
        str(spec.workers),
        '--device',
        spec.device,
        '--results-file',
        str(result),
        '--results-format',
        'json',
    ]
    if spec.num_classes_of(arm) is not None:
        argv += ['--num-classes', str(spec.num_classes_of(arm))]
    return Step(
        f'validate/{arm}/seed{seed}/{which}/{size}px',
        'validate',
        tuple(argv),
        (f'train/{arm}/seed{seed}',),
        arm,
        seed,
        str(result),
    )


def _robustness_step(spec: ExperimentSpec, seed: int) -> Step:
    """Both arms' best checkpoints on the same corrupted images, in one run of the robustness command."""
    out = spec.root / 'robustness' / f'seed{seed}'
    data = []
    for flag, folder in (
        ('--imagenet-c', spec.imagenet_c),
        ('--imagenet-a', spec.imagenet_a),
        ('--imagenet-r', spec.imagenet_r),
    ):
        if folder:
            data += [flag, folder]
    if not data:
        data = [
            '--corrupt',
            str(Path(spec.data_dir) / spec.val_split),
            '--corrupt-size',
            str(spec.test_size),
            '--seed',
            str(seed),
        ]
    if spec.corruptions:
        data += ['--corruptions', *spec.corruptions]
    if spec.severities:
        data += ['--severities', *map(str, spec.severities)]
    argv = [
        *_timm_tcnn('robustness', spec.model),
        '--checkpoint',
        str(spec.checkpoint('tcnn', seed, 'best')),
        *_kwargs_args(spec.eval_kwargs('tcnn')),
        '--compare',
        spec.cnn_model,
        '--compare-checkpoint',
        str(spec.checkpoint('cnn', seed, 'best')),
        *(['--compare-model-kwargs', *_kwargs_args(spec.eval_kwargs('cnn'))[1:]] if spec.eval_kwargs('cnn') else []),
        *data,
        '--img-size',
        str(spec.test_size),
        '--out',
        str(out),
        '--batch-size',
        str(spec.eval_batch_size),
        '--workers',
        str(spec.workers),
        '--device',
        spec.device,
    ]
    return Step(
        f'robustness/seed{seed}',
        'robustness',
        tuple(argv),
        (f'train/tcnn/seed{seed}', f'train/cnn/seed{seed}'),
        None,
        seed,
        str(out / 'robustness.json'),
    )


def analyze_argv(spec: ExperimentSpec, checkpoint: str, out: Path, model_kwargs: Dict[str, Any]) -> List[str]:
    """`timm-tcnn analyze` of a T-CNN checkpoint against the CNN weights the experiment starts from."""
    return [
        'analyze',
        spec.model,
        '--checkpoint',
        checkpoint,
        *_kwargs_args(model_kwargs),
        '--cnn',
        str(spec.root / 'identity' / 'cnn.safetensors'),
        '--images',
        str(Path(spec.data_dir) / spec.val_split),
        '--out',
        str(out),
        '--overwrite',
        '--max-images',
        str(spec.analyze_images),
        '--img-size',
        str(spec.test_size),
        '--no-plots',
    ]


def _analyze_step(spec: ExperimentSpec, seed: int) -> Step:
    out = spec.root / 'analyze' / f'seed{seed}'
    argv = analyze_argv(spec, str(spec.checkpoint('tcnn', seed, 'last')), out, spec.eval_kwargs('tcnn'))
    return Step(
        f'analyze/seed{seed}',
        'analyze',
        (sys.executable, '-m', 'timm_tcnn', *argv),
        (f'train/tcnn/seed{seed}',),
        'tcnn',
        seed,
        str(out / 'attention_stats.json'),
    )


def _predictions_step(spec: ExperimentSpec, arm: str, seed: int) -> Step:
    return Step(
        f'predictions/{arm}/seed{seed}',
        'predictions',
        (),
        (f'train/{arm}/seed{seed}',),
        arm,
        seed,
        str(spec.predictions(arm, seed)),
    )


def build_steps(spec: ExperimentSpec, transfer: bool = False) -> List[Step]:
    """Every step of the experiment in the order they run: identity, the starting CNN's predictions (not in a
    transfer, whose classifier is new), the scratch arm's recipe, then per seed every arm's training, validation and
    predictions (in process), the robustness of `tcnn` and `cnn`, and the T-CNN's analysis.
    With `transfer`, per seed first the starting CNN with its new classifier (in process)."""
    steps = [Step('identity', 'identity', (), result=str(spec.root / 'identity' / 'identity.json'))]
    if not transfer:
        steps.append(
            Step('predictions/start', 'predictions', (), ('identity',), result=str(spec.predictions(None, None)))
        )
    if 'scratch' in spec.arms:
        steps.append(Step('scratch/recipe', 'scratch-recipe', (), result=str(spec.scratch_recipe)))
    arms = [arm for arm in ARMS if arm in spec.arms]
    for seed in spec.seeds:
        if transfer:
            steps.append(
                Step(
                    f'start/seed{seed}', 'start', (), ('identity',), seed=seed, result=str(spec.start_checkpoint(seed))
                )
            )
        steps += [_train_step(spec, arm, seed, transfer) for arm in arms]
        for arm in arms:
            steps += [
                _validate_step(spec, arm, seed, which, size)
                for which in CHECKPOINTS
                for size in sorted({spec.train_size, spec.test_size})
            ]
            steps.append(_predictions_step(spec, arm, seed))
        if 'cnn' in spec.arms:
            steps.append(_robustness_step(spec, seed))
        steps.append(_analyze_step(spec, seed))
    return steps
