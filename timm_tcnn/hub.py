""" Finding CNN weights on the Hugging Face Hub or in its local cache, failing fast when neither is there. """
import os
import socket
from typing import Optional
from urllib.parse import urlparse

import huggingface_hub.constants as hf_constants
from huggingface_hub import try_to_load_from_cache

from .errors import InputError

__all__ = ['HubWeightsUnavailable', 'hub_unavailable_message', 'require_hub_weights']

_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')
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


def _is_cached(hf_hub_id: str, cache_dir: Optional[str]) -> bool:
    return any(isinstance(try_to_load_from_cache(hf_hub_id, name, cache_dir=cache_dir), str) for name in _WEIGHT_FILES)


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
    if _is_cached(hf_hub_id, cache_dir):
        return
    if hf_constants.HF_HUB_OFFLINE:
        raise HubWeightsUnavailable(hub_unavailable_message(hf_hub_id, 'offline mode (HF_HUB_OFFLINE) and not cached'))
    if not _endpoint_reachable(timeout):
        raise HubWeightsUnavailable(hub_unavailable_message(
            hf_hub_id, f'{hf_constants.ENDPOINT} is unreachable and the weights are not cached'))
