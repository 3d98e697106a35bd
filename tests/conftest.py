import pytest
import torch

from timm_tcnn.utils.numerics import relative_error  # noqa: F401  max |out - ref| / max |ref|, inf if not finite


def attention_path(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`model(x)` through the attention computation: with autograd on, converted layers never take
    their inference shortcut to `F.conv2d`."""
    with torch.enable_grad():
        return model(x).detach()


def randomize_batchnorm(model: torch.nn.Module, generator: torch.Generator, in_chans: int = 3) -> torch.nn.Module:
    """Give every BatchNorm random affine parameters and running statistics measured on random
    images, so that eval-mode outputs depend on them and the network stays well conditioned."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in norms:
            m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
            m.bias.copy_(torch.rand(m.bias.shape, generator=generator) - 0.5)
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration pass
        was_training = model.training
        model.train()
        model(torch.randn(4, in_chans, 64, 64, generator=generator))
        model.train(was_training)
        for m in norms:
            m.momentum = 0.1
    return model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class OfflineHub:
    """A Hugging Face cache holding random CNN weights under timm's Hub ids, used in offline mode."""

    def __init__(self, cache_dir, state_dicts):
        self.cache_dir = cache_dir
        self.state_dicts = state_dicts  # hub id -> CNN state dict stored in the cache

    def add(self, repo_id: str, state_dict, filename: str = 'model.safetensors', revision: str = 'a' * 40):
        """Store `state_dict` as `repo_id`'s weights in the cache layout huggingface_hub reads."""
        from safetensors.torch import save_file
        repo_dir = self.cache_dir / f'models--{repo_id.replace("/", "--")}'
        snapshot = repo_dir / 'snapshots' / revision
        snapshot.mkdir(parents=True, exist_ok=True)
        (repo_dir / 'refs').mkdir(exist_ok=True)
        (repo_dir / 'refs' / 'main').write_text(revision)
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(snapshot / filename))
        self.state_dicts[repo_id] = state_dict


@pytest.fixture(scope='session')
def offline_hub(tmp_path_factory):
    """Offline mode with a cache of random-weight `timm/resnetrs50.tf_in1k` and `timm/resnetrs101.tf_in1k`.

    BatchNorm statistics are randomised so that eval-mode comparisons are meaningful. The cache is
    also exported as HF_HUB_CACHE for subprocesses (with HF_HUB_OFFLINE=1).
    """
    import timm
    import huggingface_hub.constants as hf_constants
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
