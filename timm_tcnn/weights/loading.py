""" Building any timm model (T-CNNs included) with its weights from the Hub or a checkpoint file. """
import difflib
import pickle
import re
from pathlib import Path
from typing import Any, Dict, Optional

import timm
import torch
import torch.nn as nn
from safetensors import SafetensorError

from ..errors import InputError
from ..models.convert import convert_cnn_state_dict
from ..models.state_dicts import attention_layer_names, checkpoint_options
from ..utils.hub import require_hub_model, require_hub_weights
from ..utils.io import read_mapping
from .checkpoint import load_checkpoint_state_dict
from .checks import check_finite, check_fits

__all__ = [
    'unknown_model_hint', 'check_model_source', 'create_model', 'create_model_with_weights', 'read_cnn_checkpoint',
    'load_cnn', 'cnn_state_dict',
]

# what reading a damaged weights file raises besides RuntimeError
_UNREADABLE = (SafetensorError, pickle.UnpicklingError, EOFError)
_UNKNOWN_MODEL = re.compile(r'Unknown model \((.+)\)')


def unknown_model_hint(exc: BaseException) -> Optional[str]:
    """For timm's `RuntimeError('Unknown model (name)')`, the closest registered names; else None."""
    match = _UNKNOWN_MODEL.fullmatch(str(exc)) if isinstance(exc, RuntimeError) else None
    if match is None:
        return None
    name = match.group(1)
    close = difflib.get_close_matches(name, timm.list_models(), n=1, cutoff=0.6)
    suggestion = f'Did you mean {close[0]!r}? ' if close else ''
    return f'{suggestion}{name!r} is not a registered model; T-CNN models: {", ".join(timm.list_models("tcnn_*"))}.'


def _check_local_dir(folder: str) -> None:
    """A `local-dir:` folder holds a config.json (a mapping naming the architecture), as timm's loader needs."""
    path = Path(folder)
    if not path.is_dir():
        raise InputError(f'local-dir:{folder}: {folder} is not a folder; name a folder written by timm-tcnn '
                         f'convert or publish --out (config.json and model.safetensors).')
    if not (path / 'config.json').is_file():
        raise InputError(f'local-dir:{folder} has no config.json: a model folder holds config.json and '
                         f'model.safetensors (timm-tcnn convert or publish --out writes both); copy it completely.')
    if 'architecture' not in read_mapping(path / 'config.json', f'local-dir:{folder}: config'):
        raise InputError(f'local-dir:{folder}: its config.json names no architecture; write the folder again.')


def check_model_source(name: str, pretrained: bool) -> None:
    """Before building: a `local-dir:` folder is complete; an `hf-hub:` model is cached or downloadable (seconds);
    with `pretrained`, a registered model's Hub weights are cached or downloadable."""
    source, model_id = timm.models.parse_model_name(name)
    if source == 'local-dir':
        _check_local_dir(model_id)
    elif source == 'hf-hub':
        require_hub_model(model_id.split('@')[0], pretrained)
    elif pretrained and timm.is_model(name):
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is not None and cfg.hf_hub_id:
            require_hub_weights(cfg.hf_hub_id)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """`timm.create_model`, with an unknown name (closest names suggested), bad model kwargs or an incomplete or
    damaged `local-dir:` folder as `InputError`; Hub weights (and `hf-hub:` models) that are neither cached nor
    downloadable fail within seconds."""
    check_model_source(name, bool(kwargs.get('pretrained')))
    try:
        return timm.create_model(name, **kwargs)
    except (RuntimeError, *_UNREADABLE) as e:
        hint = unknown_model_hint(e)
        if hint is not None:
            raise InputError(f'{e}. {hint}') from None
        if not name.startswith('local-dir:'):
            raise
        raise InputError(f'{name}: its weights do not load ({type(e).__name__}: {str(e).splitlines()[0]}): a '
                         f'truncated or damaged file, or weights of another model; write or copy the folder '
                         f'again.') from None
    except (TypeError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        options = {k: v for k, v in kwargs.items() if k not in ('pretrained', 'pretrained_cfg')}
        raise InputError(f'cannot build {name} with {options}: {e}') from None


def create_model_with_weights(
        name: str,
        pretrained: bool = False,
        checkpoint: Optional[str] = None,
        use_ema: bool = False,
        **kwargs: Any,
) -> nn.Module:
    """`timm.create_model(name, pretrained, **kwargs)`, then `checkpoint` loaded strictly.

    The checkpoint is read safely (`load_checkpoint_state_dict`); a CNN checkpoint given for a T-CNN is
    converted exactly. Raises `InputError` for an unknown name (with the closest names), weights holding
    NaN or Inf (named), or a checkpoint that does not fit (saying which variant and class count it fits).
    """
    state_dict = load_checkpoint_state_dict(checkpoint, use_ema=use_ema) if checkpoint else None
    if state_dict is not None:
        check_finite(state_dict, f'checkpoint {checkpoint}')
    model = create_model(name, pretrained=pretrained, **kwargs)
    if state_dict is None:
        if pretrained:
            check_finite(model.state_dict(), f'the pretrained weights of {name}')
        return model
    state_dict = convert_cnn_state_dict(state_dict, model)
    check_fits(state_dict, model, f'checkpoint {checkpoint}')
    model.load_state_dict(state_dict)
    return model


def read_cnn_checkpoint(
        path: str,
        use_ema: bool = False,
        source: Optional[str] = None,
        refusal: str = 'CNN weights are needed here; pass the CNN checkpoint it was converted from.',
) -> Dict[str, torch.Tensor]:
    """The state dict of a CNN checkpoint file, read safely; a T-CNN checkpoint is refused (`refusal` says what to do
    instead), and so are weights holding NaN or Inf. `source` names the file in errors."""
    source = source or f'checkpoint {path}'
    state_dict = load_checkpoint_state_dict(path, use_ema=use_ema)
    layers = attention_layer_names(state_dict)
    if layers:
        raise InputError(f'{source} is a T-CNN checkpoint (converted layers such as {layers[0]}): {refusal}')
    check_finite(state_dict, source)
    return state_dict


def load_cnn(
        name: str,
        checkpoint: Optional[str] = None,
        use_ema: bool = False,
        source: Optional[str] = None,
        refusal: Optional[str] = None,
        device: Optional[str] = None,
        **kwargs: Any,
) -> nn.Module:
    """The CNN `name` built with `kwargs`, with the weights of `checkpoint` or else timm's pretrained weights.

    A checkpoint is read with `read_cnn_checkpoint`; the class count (and any other option) it was saved with is
    read from its entries, then it must fit exactly (`check_fits`). Pretrained weights come from the Hub or its
    cache (failing within seconds when neither has them) and must be finite. On the `meta` device the checkpoint
    is checked but not loaded.
    """
    placed = {'device': device} if device else {}
    if checkpoint:
        source = source or f'checkpoint {checkpoint}'
        state_dict = read_cnn_checkpoint(checkpoint, use_ema, source, **({'refusal': refusal} if refusal else {}))
        found = checkpoint_options(state_dict, create_model(name, device='meta', **kwargs))
        cnn = create_model(name, **placed, **{**kwargs, **found})
        check_fits(state_dict, cnn, source)
        if device != 'meta':
            cnn.load_state_dict(state_dict)
        return cnn
    try:
        cnn = create_model(name, pretrained=True, **placed, **kwargs)
    except RuntimeError as e:  # architecture kwargs the weights do not fit
        if isinstance(e, InputError):
            raise
        raise InputError(f'the pretrained weights of {name} do not fit it built with {kwargs}: '
                         f'{str(e).splitlines()[0]}') from None
    check_finite(cnn.state_dict(), f'the pretrained weights of {name}')
    return cnn


def cnn_state_dict(source: str, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The weights of a source CNN: a checkpoint file (read safely, finite), or a timm model name (also
    `hf-hub:ORG/NAME`, `local-dir:FOLDER`) built with its pretrained weights."""
    if Path(source).is_file():
        state_dict = load_checkpoint_state_dict(source, use_ema=use_ema)
        check_finite(state_dict, f'--cnn {source}')
        return state_dict
    if not timm.is_model(source) and not timm.models.parse_model_name(source)[0]:
        raise InputError(f'--cnn {source} is neither a file nor a timm model name (e.g. resnetrs50, hf-hub:ORG/NAME, '
                         f'local-dir:FOLDER).')
    return create_model_with_weights(source, pretrained=True).state_dict()
