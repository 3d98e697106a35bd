""" The registry of published fine-tuned T-CNN weights: pretrained tags backed by Hugging Face Hub repos.

The registry is data: `published_weights.json`, shipped inside the package, holds a list of entries

    {
      "architecture": "tcnn_resnet50rs",
      "tag": "ft_in1k",
      "hf_hub_id": "ORG/tcnn_resnet50rs.ft_in1k",
      "num_classes": 1000,
      "input_size": [3, 160, 160],
      "test_input_size": [3, 224, 224],
      "crop_pct": 0.91,
      "model_args": {"num_classes": 1000, "tcnn_stages": [4], "tcnn_convert_strided": true, ...}
    }

Other keys are timm `PretrainedCfg` fields (`interpolation`, `mean`, `std`, `pool_size`, `license`, ...).
`model_args` is the `model_args` of the repo's `config.json` and must spell out every T-CNN option.
`timm-tcnn publish` prints the entry of what it published. Importing `timm_tcnn` turns every entry into
the pretrained tag `architecture.tag`; `register_published_weights` adds entries at run time (re-registering
the architecture with timm's public `register_model`, which replaces a registration with its tags).

A pretrained tag rebuilds the architecture with its default options (only the class count comes from the
tag), so an entry whose `model_args` differ from those defaults is refused: such weights load with
`timm.create_model('hf-hub:ORG/NAME', pretrained=True)`, which rebuilds from `config.json`.
"""
import dataclasses
import inspect
import json
import re
import sys
import warnings
from collections import deque
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Union

from huggingface_hub.utils import HFValidationError, validate_repo_id
from timm.models import PretrainedCfg, is_model_pretrained, model_entrypoint, register_model, split_model_name_tag
from timm.models.resnet import ResNet

from .variants import VARIANTS

__all__ = [
    'PublishedWeightsError', 'load_published_weights', 'published_cfgs', 'registry_entry', 'check_registry_entry',
    'register_published_weights', 'unregister_published_weights',
]

REGISTRY_FILE = 'published_weights.json'
PAPER_IDS = 'arXiv:2106.05795'
PAPER_NAME = 'Transformed CNNs: recasting pre-trained convolutional layers with self-attention'

_REQUIRED = ('architecture', 'tag', 'hf_hub_id', 'num_classes', 'input_size', 'crop_pct', 'model_args')
# weight sources other than the Hub repo, and fields the registry sets itself
_FORBIDDEN = ('url', 'file', 'state_dict', 'hf_hub_filename', 'source', 'custom_load')
_TUPLE_FIELDS = ('input_size', 'test_input_size', 'min_input_size', 'mean', 'std', 'pool_size', 'test_pool_size')
_CFG_FIELDS = {f.name for f in dataclasses.fields(PretrainedCfg)}
_TAG = re.compile(r'[a-z0-9][a-z0-9_]*')
_RESERVED_TAGS = ('tf_in1k',)  # the CNN weights converted on load
_GLOBAL_POOL = inspect.signature(ResNet.__init__).parameters['global_pool'].default

_runtime_names: Set[str] = set()  # tags added by register_published_weights


class PublishedWeightsError(ValueError):
    """A registry entry is malformed or describes weights its pretrained tag could not rebuild."""


def load_published_weights(path: Optional[Union[str, Path]] = None) -> List[Dict[str, Any]]:
    """The entries of a registry JSON file (default: the one shipped with the package)."""
    if path is None:
        text = resources.files(__package__).joinpath(REGISTRY_FILE).read_text(encoding='utf-8')
        where = f'timm_tcnn/models/{REGISTRY_FILE}'
    else:
        text = Path(path).read_text(encoding='utf-8')
        where = str(path)
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as e:
        raise PublishedWeightsError(f'{where} is not valid JSON: {e}') from None
    if not isinstance(entries, list):
        raise PublishedWeightsError(f'{where} must hold a JSON list of entries, got {type(entries).__name__}.')
    return entries


def _check_model_args(name: str, entry: Mapping[str, Any], options: Mapping[str, Any]) -> None:
    """`model_args` must spell out every T-CNN option, all equal to what the tag rebuilds (`options`: the
    architecture's defaults)."""
    model_args = entry['model_args']
    if not isinstance(model_args, dict):
        raise PublishedWeightsError(f'{name}: model_args must be an object, got {type(model_args).__name__}.')
    missing = [k for k in options if k not in model_args]
    if missing:
        raise PublishedWeightsError(
            f'{name}: model_args must spell out every T-CNN option; missing {missing}. Copy model_args from the '
            f"repo's config.json (timm-tcnn publish writes them all).")
    rebuilt = dict(options, num_classes=entry['num_classes'], in_chans=tuple(entry['input_size'])[0],
                   global_pool=_GLOBAL_POOL)
    for key, value in model_args.items():
        expected = rebuilt.get(key, '<not an option the tag sets>')
        same = (isinstance(value, (list, tuple)) and list(value) == list(expected)) if key == 'tcnn_stages' \
            else value == expected
        if not same:
            raise PublishedWeightsError(
                f'{name}: model_args {key}={value!r}, but the pretrained tag builds {entry["architecture"]} with '
                f'{key}={expected!r}, so it could not load these weights. Load them with '
                f"timm.create_model('hf-hub:{entry['hf_hub_id']}', pretrained=True) (rebuilt from config.json) "
                f'instead of listing a tag.')


def _entry_cfg(entry: Any, architectures: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """Validate one entry and return its pretrained cfg (without `architecture` and `tag`)."""
    if not isinstance(entry, dict):
        raise PublishedWeightsError(f'Each registry entry must be an object, got {entry!r}.')
    name = f'{entry.get("architecture")}.{entry.get("tag")}'
    missing = [k for k in _REQUIRED if k not in entry]
    if missing:
        raise PublishedWeightsError(f'{name}: missing required keys {missing} (required: {list(_REQUIRED)}).')
    unknown = sorted(set(entry) - _CFG_FIELDS - {'model_args'})
    forbidden = [k for k in _FORBIDDEN if k in entry]
    if unknown or forbidden:
        raise PublishedWeightsError(
            f'{name}: keys {unknown + forbidden} are not allowed; entries hold timm PretrainedCfg fields '
            f'(weights come only from hf_hub_id) plus model_args.')
    if entry['architecture'] not in architectures:
        raise PublishedWeightsError(f'{name}: unknown architecture; use one of {sorted(architectures)}.')
    tag = entry['tag']
    if not isinstance(tag, str) or not _TAG.fullmatch(tag) or tag in _RESERVED_TAGS:
        raise PublishedWeightsError(
            f'{name}: tag must be lower-case letters, digits and underscores, other than {list(_RESERVED_TAGS)}.')
    hf_hub_id = entry['hf_hub_id']
    try:
        validate_repo_id(hf_hub_id)
    except HFValidationError as e:
        raise PublishedWeightsError(f'{name}: hf_hub_id {hf_hub_id!r} is not a Hub repo id: {e}') from None
    if '/' not in hf_hub_id:
        raise PublishedWeightsError(f'{name}: hf_hub_id {hf_hub_id!r} must be ORG/NAME.')
    if not isinstance(entry['num_classes'], int) or entry['num_classes'] < 1:
        raise PublishedWeightsError(f'{name}: num_classes must be a positive integer, got {entry["num_classes"]!r}.')
    _check_model_args(name, entry, architectures[entry['architecture']])
    cfg = {k: v for k, v in entry.items() if k not in ('architecture', 'tag', 'model_args')}
    cfg.update({k: tuple(cfg[k]) for k in _TUPLE_FIELDS if cfg.get(k) is not None})
    cfg.setdefault('paper_ids', PAPER_IDS)
    cfg.setdefault('paper_name', PAPER_NAME)
    return cfg


def published_cfgs(
        architectures: Mapping[str, Mapping[str, Any]],
        entries: Optional[Sequence[Any]] = None,
) -> Dict[str, Dict[str, Any]]:
    """Pretrained cfgs keyed `architecture.tag`, for `generate_default_cfgs`.

    Args:
        architectures: names entries may use -> every T-CNN option with the value it is built with by default.
        entries: registry entries; default: the shipped registry.
    """
    entries = load_published_weights() if entries is None else entries
    cfgs: Dict[str, Dict[str, Any]] = {}
    for entry in entries:
        cfg = _entry_cfg(entry, architectures)
        name = f'{entry["architecture"]}.{entry["tag"]}'
        if name in cfgs:
            raise PublishedWeightsError(f'{name} is listed twice.')
        cfgs[name] = cfg
    return cfgs


def registry_entry(config: Mapping[str, Any], tag: str, hf_hub_id: str) -> Dict[str, Any]:
    """The registry entry of a published repo, from its `config.json` contents."""
    pretrained_cfg = config.get('pretrained_cfg', {})
    entry = dict(architecture=config['architecture'], tag=tag, hf_hub_id=hf_hub_id,
                 num_classes=config['num_classes'])
    entry.update({k: v for k, v in pretrained_cfg.items()
                  if k in _CFG_FIELDS and k not in entry and k not in _FORBIDDEN + ('architecture', 'tag')})
    entry['model_args'] = dict(config.get('model_args', {}))
    return entry


def _tcnn_architectures() -> Dict[str, Dict[str, Any]]:
    """Registered T-CNN names -> their default options."""
    return {row.name: row.options.to_kwargs() for row in VARIANTS.values()}


def check_registry_entry(entry: Mapping[str, Any]) -> None:
    """Raise a `PublishedWeightsError` unless `entry` can be listed as a pretrained tag."""
    _entry_cfg(dict(entry), _tcnn_architectures())


def _register_again(arch: str, tags: Mapping[str, Optional[PretrainedCfg]]) -> None:
    """Re-register `arch` with timm's public `register_model`, its module's `default_cfgs` entry given new tags
    (a None cfg removes the tag). timm replaces an existing registration, pretrained tags included."""
    entrypoint = model_entrypoint(arch)
    module = sys.modules[entrypoint.__module__]
    old = module.default_cfgs[arch]
    cfgs = {tag: cfg for tag, cfg in {**old.cfgs, **tags}.items() if cfg is not None}
    order = [tag for tag in dict.fromkeys([*old.tags, *tags]) if tag in cfgs]  # existing tags first: same default
    module.default_cfgs[arch] = dataclasses.replace(old, tags=deque(order), cfgs=cfgs)
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='Overwriting', category=UserWarning)
        register_model(entrypoint)


def register_published_weights(entries: Union[Mapping[str, Any], Iterable[Mapping[str, Any]]]) -> List[str]:
    """Add registry entries (dicts as in `published_weights.json`) as pretrained tags now.

    Returns the new `architecture.tag` names. Existing tags are never replaced; the default tag stays.
    """
    entries = [entries] if isinstance(entries, Mapping) else list(entries)
    cfgs = published_cfgs(_tcnn_architectures(), entries)
    taken = [name for name in cfgs if is_model_pretrained(name)]
    if taken:
        raise PublishedWeightsError(f'Pretrained tags {taken} exist already; choose another tag.')
    by_arch: Dict[str, Dict[str, PretrainedCfg]] = {}
    for name, cfg in cfgs.items():
        arch, tag = split_model_name_tag(name)
        by_arch.setdefault(arch, {})[tag] = PretrainedCfg(**cfg)
    for arch, tags in by_arch.items():
        _register_again(arch, tags)
    _runtime_names.update(cfgs)
    return list(cfgs)


def unregister_published_weights(names: Iterable[str]) -> None:
    """Remove tags added by `register_published_weights`."""
    names = list(names)
    unknown = [n for n in names if n not in _runtime_names]
    if unknown:
        raise PublishedWeightsError(f'{unknown} were not added by register_published_weights.')
    by_arch: Dict[str, Dict[str, None]] = {}
    for name in names:
        arch, tag = split_model_name_tag(name)
        by_arch.setdefault(arch, {})[tag] = None
    for arch, tags in by_arch.items():
        _register_again(arch, tags)
    _runtime_names.difference_update(names)
