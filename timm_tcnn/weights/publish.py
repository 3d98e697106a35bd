""" Publishing fine-tuned T-CNN checkpoints: rebuild, validate, write a Hub folder atomically, upload.

The folder holds `model.safetensors`, `config.json` (whose `model_args` spell out every T-CNN option, so
a later change of a default never changes what the checkpoint rebuilds into) and a model card
`README.md`; `timm.create_model('local-dir:DIR')` and, once uploaded, `timm.create_model('hf-hub:ORG/NAME')`
rebuild the model from it.
"""
import contextlib
import dataclasses
import importlib
import importlib.util
import math
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Union

import timm
import torch
import torch.nn as nn
from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils.sha import sha_fileobj
from timm.models import get_pretrained_cfg, save_for_hf, split_model_name_tag

from ..errors import InputError, WorkError
from ..models.published import PAPER_IDS, PAPER_NAME
from ..models.state_dicts import attention_layer_names
from ..models.variants import VARIANTS, conversion_options
from ..utils.io import atomic_directory, read_mapping
from ..utils.numerics import relative_error
from ..version import __version__
from .checks import check_finite, check_fits

__all__ = [
    'PublishError', 'read_train_args', 'resolve_model_args', 'StartWeights', 'start_weights',
    'published_pretrained_cfg', 'check_weights',
    'write_model_folder', 'HubTarget', 'check_hub_target', 'upload_model_folder',
]

ARCHITECTURES = tuple(VARIANTS)
HUB_FILES = ('model.safetensors', 'config.json', 'README.md')
_CHECK_SIZE = 64  # side of the random images the written folder is checked on
# connection failures of the HTTP library huggingface_hub uses (httpx2, httpx; requests' are OSErrors)
_NETWORK_ERRORS = (OSError, *(importlib.import_module(m).TransportError
                              for m in ('httpx2', 'httpx') if importlib.util.find_spec(m)))


class PublishError(InputError):
    """Inputs that cannot be published as they are; the message says what is wrong and what to do."""


def read_train_args(path: Union[str, Path]) -> Dict[str, Any]:
    """The arguments of a train.py run (its `args.yaml`)."""
    return read_mapping(path, "Training arguments (the run's args.yaml)")


def resolve_model_args(
        model_name: Optional[str],
        train_args: Optional[Mapping[str, Any]] = None,
        model_kwargs: Optional[Mapping[str, Any]] = None,
        num_classes: Optional[int] = None,
) -> Tuple[str, Dict[str, Any]]:
    """The architecture and its complete `create_model` arguments.

    Sources, later ones winning: the run's training arguments (`model`, `num_classes`, `in_chans` /
    `input_size`, `gp`, `model_kwargs`), then `model_kwargs`, then `num_classes`. Every T-CNN option is
    spelt out, with the `TcnnResNet` default where no source sets it.
    """
    train_args = dict(train_args or {})
    trained = split_model_name_tag(train_args['model'])[0] if train_args.get('model') else None
    arch = split_model_name_tag(model_name)[0] if model_name else trained
    if arch is None:
        raise PublishError('Name the architecture (--model tcnn_resnet50rs) or pass the run\'s args.yaml.')
    if trained is not None and trained != arch:
        raise PublishError(
            f'The run trained {trained} (args.yaml model) but {arch} was asked for: weights of one variant do '
            f'not fit another. Use --model {trained}.')
    if arch not in ARCHITECTURES:
        raise PublishError(f'{arch} is not a T-CNN architecture; use one of {", ".join(ARCHITECTURES)}.')
    if num_classes is not None and train_args.get('num_classes') not in (None, num_classes):
        raise PublishError(
            f'The run trained {train_args["num_classes"]} classes (args.yaml num_classes) but {num_classes} '
            f'were asked for.')
    kwargs = {**(train_args.get('model_kwargs') or {}), **(model_kwargs or {})}
    tcnn = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith('tcnn_')}
    try:
        model_args = {**kwargs, **conversion_options(arch, **tcnn)}
    except (TypeError, ValueError) as e:
        raise PublishError(str(e)) from None
    input_size = train_args.get('input_size')
    found = dict(
        num_classes=num_classes if num_classes is not None else train_args.get('num_classes'),
        in_chans=train_args.get('in_chans') or (input_size[0] if input_size else None),
        global_pool=train_args.get('gp'),
    )
    model_args.update({k: v for k, v in found.items() if v is not None})
    return arch, model_args


@dataclasses.dataclass(frozen=True)
class StartWeights:
    """Where the fine-tuning of published weights started: Hub weights (`hub_id`), a local file (`file`, its
    `sha256`) or a random initialisation (neither)."""
    hub_id: Optional[str] = None
    file: Optional[str] = None
    sha256: Optional[str] = None

    def describe(self) -> str:
        if self.hub_id:
            return self.hub_id
        if self.file:
            return f'the local file {self.file} (sha256 {self.sha256})'
        return 'a random initialisation'


_START_KEYS = ('pretrained', 'pretrained_path', 'initial_checkpoint')  # what args.yaml says about the start


def _local_start(path: Union[str, Path], option: str) -> StartWeights:
    path = Path(path)
    if not path.is_file():
        raise PublishError(f'{option} names {path} as the weights the run started from, but it is not on this machine: '
                           f'pass --base-weights FILE (a copy of it, to record its name and sha256).')
    with open(path, 'rb') as f:
        return StartWeights(file=path.name, sha256=sha_fileobj(f).hex())


def start_weights(train_args: Optional[Mapping[str, Any]], base_weights: Optional[str] = None) -> StartWeights:
    """Where a run's fine-tuning started: `base_weights` ('hf-hub:ORG/NAME', 'random' or a file), else the run's
    args.yaml: train.py's `--pretrained-path` or `--initial-checkpoint` (a local file, hashed), `--pretrained` (the
    Hub weights of its `--model`, tag included) or none of them (random). Unknown without either: a `PublishError`."""
    if base_weights:
        if base_weights == 'random':
            return StartWeights()
        if base_weights.startswith('hf-hub:'):
            return StartWeights(hub_id=base_weights[len('hf-hub:'):])
        return _local_start(base_weights, '--base-weights')
    train_args = train_args or {}
    if not any(k in train_args for k in _START_KEYS):
        raise PublishError('Where the fine-tuning started is not known (no args.yaml, or one without pretrained, '
                           'pretrained_path and initial_checkpoint): pass --base-weights hf-hub:ORG/NAME, FILE or '
                           'random.')
    path = (train_args.get('pretrained') and train_args.get('pretrained_path')) or train_args.get('initial_checkpoint')
    if path:
        return _local_start(path, 'args.yaml')
    if train_args.get('pretrained'):
        cfg = get_pretrained_cfg(train_args['model'])
        return StartWeights(hub_id=cfg.hf_hub_id if cfg is not None else None)
    return StartWeights()


def _present(value: Any) -> bool:
    """A value worth recording: train.py writes '' and None for options left at their default."""
    return value not in (None, '', [], ())


def published_pretrained_cfg(
        arch: str,
        model_args: Mapping[str, Any],
        start: StartWeights,
        train_args: Optional[Mapping[str, Any]] = None,
        img_size: Optional[int] = None,
        test_img_size: Optional[int] = None,
        crop_pct: Optional[float] = None,
        license: str = 'apache-2.0',
) -> Dict[str, Any]:
    """The published weights' pretrained cfg: the CNN's preprocessing (of the run's pretrained tag), updated by the
    run's training arguments that are set (`input_size` / `img_size`, `crop_pct`, `interpolation`, `mean`, `std`) and
    the explicit sizes; its note says where the fine-tuning started."""
    train_args = dict(train_args or {})
    trained = train_args.get('model')
    cnn_cfg = get_pretrained_cfg(trained if trained and split_model_name_tag(trained)[0] == arch else arch).to_dict()
    keep = ('input_size', 'test_input_size', 'fixed_input_size', 'interpolation', 'crop_pct', 'test_crop_pct',
            'crop_mode', 'mean', 'std', 'first_conv', 'classifier')
    cfg = {k: cnn_cfg[k] for k in keep if cnn_cfg.get(k) is not None}
    cfg.update({k: tuple(v) if isinstance(v, list) else v
                for k in ('crop_pct', 'interpolation', 'mean', 'std') if _present(v := train_args.get(k))})
    in_chans = model_args.get('in_chans', cfg['input_size'][0])
    train_size = img_size or train_args.get('img_size') or (train_args.get('input_size') or [None, None])[-1]
    train_hw = (train_size, train_size) if train_size else tuple(cfg['input_size'][1:])
    cfg['input_size'] = (in_chans, *train_hw)
    if test_img_size:
        cfg['test_input_size'] = (in_chans, test_img_size, test_img_size)
    elif cfg.get('test_input_size'):
        cfg['test_input_size'] = (in_chans, *cfg['test_input_size'][1:])
    if crop_pct is not None:
        cfg['crop_pct'] = crop_pct
    reduction = 32  # output stride of every registered family
    cfg['pool_size'] = tuple(math.ceil(s / reduction) for s in cfg['input_size'][1:])
    if cfg.get('test_input_size'):
        cfg['test_pool_size'] = tuple(math.ceil(s / reduction) for s in cfg['test_input_size'][1:])
    cfg.update(
        num_classes=model_args.get('num_classes', cnn_cfg['num_classes']),
        license=license,
        paper_ids=PAPER_IDS,
        paper_name=PAPER_NAME,
        notes=(f'T-CNN converted from {start.describe()} and fine-tuned.' if start.hub_id or start.file else
               'T-CNN trained from a random initialisation.',),
    )
    return cfg


def check_weights(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Raise an `InputError` naming the mismatch unless `state_dict` holds fine-tuned T-CNN weights that are exactly
    `model`'s (same keys and shapes: variant, class count, T-CNN options) with finite values; then load it."""
    if not attention_layer_names(state_dict):
        raise PublishError('The checkpoint has no attention parameters: publish fine-tuned T-CNN checkpoints (the CNN '
                           'converted as it is already loads as the tf_in1k tag).')
    check_fits(state_dict, model, 'the checkpoint')
    check_finite(state_dict, 'the checkpoint')
    model.load_state_dict(state_dict, strict=True)


@torch.no_grad()
def _check_folder(folder: Path, model: nn.Module) -> None:
    """The folder must rebuild `model` through timm's `local-dir:` loader with the same logits."""
    rebuilt = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    x = torch.randn(2, model.pretrained_cfg['input_size'][0], _CHECK_SIZE, _CHECK_SIZE,
                    generator=torch.Generator().manual_seed(0))
    error = relative_error(rebuilt(x), model.eval()(x))
    if not error <= 1e-6:
        raise WorkError(f'The written folder rebuilds a different model (relative logit error {error:.1e}).')


def write_model_folder(
        out: Union[str, Path],
        model: nn.Module,
        model_args: Mapping[str, Any],
        card: str,
        overwrite: bool = False,
) -> Path:
    """Write `model.safetensors`, `config.json` and `README.md` (`card`) to `out`, all or nothing.

    The folder is written beside `out` and renamed into place after `timm.create_model('local-dir:...')`
    has rebuilt the model from it with the same logits. An existing `out` is an error unless `overwrite`.
    """
    out = Path(out)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_for_hf(model, str(tmp), model_args=dict(model_args), safe_serialization=True)
        (tmp / 'README.md').write_text(card, encoding='utf-8')
        _check_folder(tmp, model)
    return out


@contextlib.contextmanager
def _hub_errors(repo_id: str) -> Iterator[None]:
    """Hub failures as errors that say what to do: a bad token or repo is the user's (2), no network is not (1)."""
    try:
        yield
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise
    except HfHubHTTPError as e:
        status = getattr(e.response, 'status_code', None)
        if status in (401, 403):
            raise PublishError(
                f'The Hub refused access to {repo_id} (HTTP {status}): the token is invalid or may not write there. '
                f'Run `hf auth login` with a write token, or choose another --repo-id.') from None
        raise WorkError(f'The Hub request for {repo_id} failed: {str(e).splitlines()[0]}') from None
    except _NETWORK_ERRORS as e:
        raise WorkError(
            f'Cannot reach the Hugging Face Hub ({type(e).__name__}: {e}); nothing was uploaded. Check the network, '
            f'or write the folder only with --dry-run --out DIR and upload it later.') from None


class HubTarget:
    """A Hub repo and branch checked for publishing: login, write access and files already there."""

    def __init__(self, repo_id: str, revision: Optional[str], api: HfApi, repo_exists: bool, branch_exists: bool):
        self.repo_id, self.revision, self.api = repo_id, revision, api
        self.repo_exists, self.branch_exists = repo_exists, branch_exists


def check_hub_target(repo_id: str, revision: Optional[str] = None, overwrite: bool = False) -> HubTarget:
    """Before any work: logged in, the token may write to `repo_id`'s namespace, and none of the files
    `timm-tcnn publish` writes exists there at `revision` unless `overwrite`."""
    if get_token() is None:
        raise PublishError('Not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN '
                           '(or write the folder only with --dry-run --out DIR).')
    api = HfApi(library_name='timm-tcnn', library_version=__version__)
    with _hub_errors(repo_id):
        namespace = repo_id.split('/')[0]
        who = api.whoami()
        allowed = {who.get('name')} | {org.get('name') for org in who.get('orgs', [])}
        if namespace not in allowed:
            raise PublishError(f'The Hub account {who.get("name")!r} cannot create repos under {namespace!r} '
                               f'(its namespaces: {", ".join(sorted(n for n in allowed if n))}); choose another '
                               f'--repo-id.')
        repo_exists = branch_exists = True
        try:
            existing = set(api.list_repo_files(repo_id, revision=revision))
        except RepositoryNotFoundError:
            repo_exists = branch_exists = False
            existing = set()
        except RevisionNotFoundError:
            branch_exists = False
            existing = set()
    clash = sorted(existing & set(HUB_FILES))
    if clash and not overwrite:
        raise PublishError(
            f'{repo_id} already has {clash} at revision {revision or "main"}; nothing was uploaded. Choose another '
            f'--repo-id or --revision, or pass --overwrite-hub to replace them with a new commit.')
    return HubTarget(repo_id, revision, api, repo_exists, branch_exists)


def upload_model_folder(
        folder: Union[str, Path],
        target: HubTarget,
        private: bool = False,
        commit_message: str = 'Add T-CNN weights',
) -> str:
    """Upload `folder` to the checked `target` (repo and branch created if needed); returns the commit URL.

    The token comes from the usual Hugging Face login (`hf auth login`) or `HF_TOKEN`; it is never printed.
    """
    api, repo_id = target.api, target.repo_id
    with _hub_errors(repo_id):
        if not target.repo_exists:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if not target.branch_exists and target.revision:
            api.create_branch(repo_id, branch=target.revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), revision=target.revision, commit_message=commit_message)
    return commit.commit_url
