""" Finding CNN weights on the Hugging Face Hub or in its local cache, failing fast when neither is there. """
import os
import socket
from typing import Optional
from urllib.parse import urlparse

import huggingface_hub.constants as hf_constants
from huggingface_hub import try_to_load_from_cache

from ..errors import InputError

__all__ = ['HubWeightsUnavailable', 'hub_unavailable_message', 'require_hub_weights', 'require_hub_model']

_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')
_CONFIG_FILE = 'config.json'
_PROXY_VARS = ('HTTPS_PROXY', 'https_proxy', 'HTTP_PROXY', 'http_proxy', 'ALL_PROXY', 'all_proxy')


class HubWeightsUnavailable(InputError, RuntimeError):
    """The weights are neither in the local Hugging Face cache nor downloadable now."""


def hub_unavailable_message(hf_hub_id: str, reason: str) -> str:
    return (
        f'Cannot get the weights of {hf_hub_id}: {reason}. Either\n'
        f'  - download them where the Hub is reachable (`hf download {hf_hub_id}`, or '
        f'`python -c "import timm; timm.create_model(\'hf-hub:{hf_hub_id}\', pretrained=True)"`) and copy that '
        f'Hugging Face cache to this machine (HF_HUB_CACHE={hf_constants.HF_HUB_CACHE}), or\n'
        f'  - pass a local CNN checkpoint (timm-tcnn convert --checkpoint FILE; in Python '
        f'checkpoint_path=FILE or pretrained_cfg_overlay=dict(file=FILE)), or\n'
        f'  - use random weights (timm-tcnn convert --random-weights; pretrained=False).'
    )


def _model_unavailable_message(repo_id: str, reason: str) -> str:
    return (
        f'Cannot get hf-hub:{repo_id}: {reason}. Either download it where the Hub is reachable (`hf download '
        f'{repo_id}`) and copy that Hugging Face cache to this machine (HF_HUB_CACHE={hf_constants.HF_HUB_CACHE}), '
        f'or copy the model folder (config.json and model.safetensors) here and name it local-dir:FOLDER.'
    )


def _cached(repo_id: str, name: str, cache_dir: Optional[str]) -> bool:
    return isinstance(try_to_load_from_cache(repo_id, name, cache_dir=cache_dir), str)


def _is_cached(hf_hub_id: str, cache_dir: Optional[str]) -> bool:
    return any(_cached(hf_hub_id, name, cache_dir) for name in _WEIGHT_FILES)


def _unavailable_reason(timeout: float) -> Optional[str]:
    """Why nothing can be downloaded from the Hub now (offline mode, endpoint unreachable), or None."""
    if hf_constants.HF_HUB_OFFLINE:
        return 'offline mode (HF_HUB_OFFLINE) and not cached'
    if not _endpoint_reachable(timeout):
        return f'{hf_constants.ENDPOINT} is unreachable and it is not cached'
    return None


def _endpoint_reachable(timeout: float) -> bool:
    """A TCP connection to the Hub endpoint opens within `timeout` seconds (assumed true behind a proxy)."""
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    url = urlparse(hf_constants.ENDPOINT)
    port = url.port or (443 if url.scheme == 'https' else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub_weights(hf_hub_id: str, cache_dir: Optional[str] = None, timeout: float = 3.) -> None:
    """Return if `hf_hub_id`'s weights are cached or downloadable; raise `HubWeightsUnavailable` within
    about `timeout` seconds otherwise (instead of huggingface_hub's retries for tens of seconds)."""
    reason = None if _is_cached(hf_hub_id, cache_dir) else _unavailable_reason(timeout)
    if reason:
        raise HubWeightsUnavailable(hub_unavailable_message(hf_hub_id, reason))


def require_hub_model(repo_id: str, pretrained: bool, cache_dir: Optional[str] = None, timeout: float = 3.) -> None:
    """Return if what `timm.create_model('hf-hub:REPO_ID')` reads (its config.json, and its weights when
    `pretrained`) is cached or downloadable; raise `HubWeightsUnavailable` within about `timeout` seconds otherwise."""
    cached = _cached(repo_id, _CONFIG_FILE, cache_dir) and (not pretrained or _is_cached(repo_id, cache_dir))
    reason = None if cached else _unavailable_reason(timeout)
    if reason:
        raise HubWeightsUnavailable(_model_unavailable_message(repo_id, reason))
