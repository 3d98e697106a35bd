import pytest
import torch

from helpers import OfflineHub, randomize_batchnorm


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope='session')
def offline_hub(tmp_path_factory):
    """Offline mode with a cache of random-weight `timm/resnetrs50.tf_in1k` and `timm/resnetrs101.tf_in1k`.

    BatchNorm statistics are randomised so that eval-mode comparisons are meaningful. The cache is
    also exported as HF_HUB_CACHE for subprocesses (with HF_HUB_OFFLINE=1).
    """
    import huggingface_hub.constants as hf_constants
    import timm
    hub = OfflineHub(tmp_path_factory.mktemp('hf_cache'), {})
    generator = torch.Generator().manual_seed(1234)
    for name in ('resnetrs50', 'resnetrs101'):
        cnn = randomize_batchnorm(timm.create_model(name), generator)
        hub.add(f'timm/{name}.tf_in1k', cnn.state_dict())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
        mp.setattr(hf_constants, 'HF_HUB_CACHE', str(hub.cache_dir))
        mp.setenv('HF_HUB_OFFLINE', '1')
        mp.setenv('HF_HUB_CACHE', str(hub.cache_dir))
        yield hub
