""" Publishing fine-tuned T-CNN checkpoints (timm-tcnn publish), the model card, the registry of published
weights, and loading the published weights back through local-dir:, hf-hub: and a pretrained tag. """
import argparse
import hashlib
import json
import logging
import re
import shutil
from types import SimpleNamespace

import huggingface_hub
import huggingface_hub.constants as hf_constants
import pytest
import timm
import torch
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.errors import RepositoryNotFoundError
from safetensors.torch import load_file
from timm.models import generate_default_cfgs, get_pretrained_cfg

import timm_tcnn  # noqa: F401  registers the models
from timm_tcnn import attention_layers
from timm_tcnn.cli import main
from timm_tcnn.errors import InputError
from timm_tcnn.models.published import (
    PublishedWeightsError,
    load_published_weights,
    published_cfgs,
    register_published_weights,
    registry_entry,
    unregister_published_weights,
)
from timm_tcnn.models.variants import conversion_options
from timm_tcnn.weights.checkpoint import load_checkpoint_state_dict
from timm_tcnn.weights.model_card import ModelCardInfo, render_model_card
from timm_tcnn.weights.publish import (
    PublishError,
    StartWeights,
    check_hub_target,
    check_weights,
    published_pretrained_cfg,
    resolve_model_args,
    upload_model_folder,
)
from helpers import randomize_batchnorm, relative_error

REPO_ID = 'acme/tcnn_resnet50rs.ft_test'
ARCHS = [f'tcnn_resnet{d}rs' for d in (50, 101, 152, 200, 270, 350, 420)]
VALIDATE_CSV = ('model,top1,top1_err,top5,top5_err,param_count,img_size,crop_pct,interpolation\n'
                'tcnn_resnet50rs,66.6667,33.3333,100.0,0.0,34.53,64,0.91,bicubic\n')
TOKEN = 'hf_publishTestTokenDoNotLeak123'


@pytest.fixture(scope='module')
def source(tmp_path_factory):
    """A 'fine-tuned' 3-class T-CNN (gates moved off 0, random BatchNorm) saved as train.py saves it."""
    root = tmp_path_factory.mktemp('publish_src')
    generator = torch.Generator().manual_seed(7)
    model = timm.create_model('tcnn_resnet50rs', num_classes=3)
    randomize_batchnorm(model, generator)
    with torch.no_grad():
        for _, layer in attention_layers(model):
            layer.set_attention_values(content_gate=0.3)
            layer.set_attention_values(locality_gate=0.2)
    model.eval()
    x = torch.randn(2, 3, 64, 64, generator=generator)
    with torch.no_grad():
        ref = model(x)
    ema = model.state_dict()
    raw = {k: v + 0.5 if k == 'fc.bias' else v for k, v in ema.items()}  # non-EMA weights differ
    run = root / 'run'
    run.mkdir()
    torch.save({'epoch': 2, 'arch': 'tcnn_resnet50rs', 'state_dict': raw, 'state_dict_ema': ema, 'version': 2},
               run / 'model_best.pth.tar')
    (run / 'args.yaml').write_text(yaml.safe_dump(dict(
        model='tcnn_resnet50rs', num_classes=3, model_kwargs={}, img_size=64, input_size=None, in_chans=None,
        gp=None, mean=None, std=None, interpolation='', pretrained=True, pretrained_path=None, initial_checkpoint='',
        epochs=2, lr=0.01, opt='adamw', batch_size=4, model_ema=True,
        data_dir='/private/data/path', output='/private/output')))
    (root / 'val.csv').write_text(VALIDATE_CSV)
    (root / 'robustness.json').write_text(json.dumps(
        {'mce': 0.6123, 'corruption_accuracy': 55.2, 'per_corruption': {'fog': {'ce': 0.5}}, 'errors': [1, 2]}))
    return SimpleNamespace(root=root, checkpoint=run / 'model_best.pth.tar', model=model, x=x, ref=ref)


@pytest.fixture(scope='module')
def tiny_source(tmp_path_factory):
    """A one-block-per-stage 3-class T-CNN checkpoint (plain state dict) with its args.yaml: cheap to rebuild."""
    run = tmp_path_factory.mktemp('publish_tiny')
    model = timm.create_model('tcnn_resnet50rs', layers=(1, 1, 1, 1), num_classes=3)
    torch.save(model.state_dict(), run / 'checkpoint.pth')
    (run / 'args.yaml').write_text(yaml.safe_dump(dict(
        model='tcnn_resnet50rs', num_classes=3, model_kwargs=dict(layers=[1, 1, 1, 1]), img_size=64, pretrained=False)))
    return SimpleNamespace(root=run, checkpoint=run / 'checkpoint.pth', model=model)


@pytest.fixture(scope='module')
def published(source):
    out = source.root / 'published'
    code = main(['publish', str(source.checkpoint), '--repo-id', REPO_ID, '--dry-run', '--out', str(out), '--ema',
                 '--results', f'imagenet val={source.root / "val.csv"}', '--robustness',
                 str(source.root / 'robustness.json')])
    assert code == 0
    return out


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_dry_run_writes_safetensors_and_explicit_config(published, source):
    assert sorted(p.name for p in published.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((published / 'config.json').read_text())
    assert config['architecture'] == 'tcnn_resnet50rs' and config['num_classes'] == 3
    defaults = conversion_options()
    assert {k: v for k, v in config['model_args'].items() if k.startswith('tcnn_')} == defaults
    assert config['pretrained_cfg']['input_size'] == [3, 64, 64]  # args.yaml img_size
    weights = load_file(str(published / 'model.safetensors'))
    assert torch.equal(weights['fc.bias'], source.model.state_dict()['fc.bias'])  # --ema picked the EMA weights
    assert not [p for p in source.root.iterdir() if p.name.startswith('.published')]  # no temp folder left


def test_loads_via_local_dir(published, source):
    model = timm.create_model(f'local-dir:{published}', pretrained=True)
    assert relative_error(_logits(model, source.x), source.ref) <= 1e-6


@pytest.fixture
def offline_cache(published, tmp_path, monkeypatch):
    """A Hugging Face cache holding the published folder as REPO_ID, in offline mode."""
    repo_dir = tmp_path / f'models--{REPO_ID.replace("/", "--")}'
    revision = 'b' * 40
    shutil.copytree(published, repo_dir / 'snapshots' / revision)
    (repo_dir / 'refs').mkdir()
    (repo_dir / 'refs' / 'main').write_text(revision)
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(tmp_path))
    return tmp_path


def test_loads_via_hf_hub_from_offline_cache(offline_cache, source):
    model = timm.create_model(f'hf-hub:{REPO_ID}', pretrained=True)
    assert model.num_classes == 3
    assert relative_error(_logits(model, source.x), source.ref) <= 1e-6


def test_loads_via_registered_tag(offline_cache, published, source):
    entry = registry_entry(json.loads((published / 'config.json').read_text()), 'ft_test', REPO_ID)
    names = register_published_weights(entry)
    try:
        assert names == ['tcnn_resnet50rs.ft_test']
        assert 'tcnn_resnet50rs.ft_test' in timm.list_pretrained('tcnn_resnet50rs.*')
        assert get_pretrained_cfg('tcnn_resnet50rs').tag == 'tf_in1k'  # the default tag is unchanged
        model = timm.create_model('tcnn_resnet50rs.ft_test', pretrained=True)
        assert model.num_classes == 3  # from the entry, not the architecture's 1000
        assert relative_error(_logits(model, source.x), source.ref) <= 1e-6
        with pytest.raises(PublishedWeightsError, match='exist already'):
            register_published_weights(entry)
    finally:
        unregister_published_weights(names)
    assert 'tcnn_resnet50rs.ft_test' not in timm.list_pretrained('tcnn_*')


def _entry(**changes):
    entry = dict(architecture='tcnn_resnet50rs', tag='ft_x', hf_hub_id='acme/x', num_classes=10,
                 input_size=[3, 160, 160], crop_pct=0.91, model_args=dict(conversion_options(), num_classes=10))
    entry.update(changes)
    return entry


def test_registry_entries_validated():
    assert load_published_weights() == []  # no fine-tuned weights are published yet
    options = conversion_options()
    cfgs = published_cfgs({arch: options for arch in ARCHS}, [_entry()])
    assert cfgs['tcnn_resnet50rs.ft_x']['input_size'] == (3, 160, 160)
    merged = generate_default_cfgs({'tcnn_resnet50rs.tf_in1k': dict(hf_hub_id='timm/resnetrs50.tf_in1k'), **cfgs})
    assert list(merged['tcnn_resnet50rs'].tags) == ['tf_in1k', 'ft_x']  # tf_in1k stays the default
    bad = {
        'hf-hub:acme/x': _entry(model_args=dict(options, num_classes=10, tcnn_stages=[3, 4])),
        'spell out every T-CNN option': _entry(model_args={'num_classes': 10}),
        'num_classes=10.*num_classes=3': _entry(num_classes=3),
        'tag must be': _entry(tag='tf_in1k'),
        'not allowed': _entry(url='https://example.com/w.pth'),
        'missing required': {k: v for k, v in _entry().items() if k != 'hf_hub_id'},
        'unknown architecture': _entry(architecture='resnet50'),
    }
    for message, entry in bad.items():
        with pytest.raises(PublishedWeightsError, match=message):
            published_cfgs({arch: options for arch in ARCHS}, [entry])
    with pytest.raises(PublishedWeightsError, match='listed twice'):
        published_cfgs({arch: options for arch in ARCHS}, [_entry(), _entry()])


def test_model_card(published):
    text = (published / 'README.md').read_text()
    assert text.startswith('---\n')
    meta = yaml.safe_load(text.split('---\n')[1])
    assert meta['library_name'] == 'timm'
    assert meta['base_model'] == 'timm/resnetrs50.tf_in1k'
    assert meta['license'] == 'apache-2.0' and meta['datasets'] == ['imagenet-1k']
    assert {'timm', 'image-classification'} <= set(meta['tags'])
    card = ModelCard(text)  # the Hub's own parser
    assert card.data.library_name == 'timm' and card.data.base_model == 'timm/resnetrs50.tf_in1k'
    assert '| evaluation | top-1 (%) | top-5 (%) |' in text
    assert '| imagenet val | 66.67 | 100 | 64 | 0.91 | bicubic | 34.53 |' in text
    assert '| mce | 0.6123 |' in text and '| per_corruption.fog.ce | 0.5 |' in text
    assert '| `epochs` | 2 |' in text and '/private' not in text  # recipe without local paths
    assert '| `tcnn_stages` | [4] |' in text
    assert f"timm.create_model('hf-hub:{REPO_ID}', pretrained=True)" in text
    assert 'arXiv:2106.05795' in text and "d'Ascoli" in text and 'Sagun' in text and 'Morcos' in text



@pytest.mark.parametrize('arch', sorted(timm_tcnn.VARIANTS))
def test_model_card_of_every_family(arch):
    """Every registered T-CNN publishes with a card naming its own CNN; only ResNet-RS cards cite ResNet-RS."""
    row = timm_tcnn.VARIANTS[arch]
    start = StartWeights(hub_id=f'timm/{row.cnn}.x')
    _, model_args = resolve_model_args(arch, num_classes=10)
    cfg = published_pretrained_cfg(arch, model_args, start)
    text = render_model_card(ModelCardInfo(
        repo_id=f'acme/{arch}.ft', architecture=arch, start=start, model_args=model_args, pretrained_cfg=cfg,
        param_count=1, attention_layers=['a.b'], checkpoint='model_best.pth.tar'))
    assert f"from timm's `{row.cnn}`" in text and ModelCard(text).data.base_model == f'timm/{row.cnn}.x'
    assert ('Revisiting ResNets' in text) == row.cnn.startswith('resnetrs')

class FakeHub:
    """Records the HfApi calls of an upload; `existing` are the files already in the repo (None: no repo)."""

    def __init__(self, existing=('.gitattributes',), user='acme'):
        self.existing = None if existing is None else list(existing)
        self.user = user
        self.calls = []

    def install(self, monkeypatch):
        def whoami(api, **kwargs):
            self.calls.append(('whoami',))
            return {'name': self.user, 'orgs': [{'name': 'team'}]}

        def create_repo(api, repo_id, **kwargs):
            self.calls.append(('create_repo', repo_id, kwargs))
            return SimpleNamespace(repo_id=repo_id)

        def list_repo_files(api, repo_id, revision=None, **kwargs):
            self.calls.append(('list_repo_files', repo_id, revision))
            if self.existing is None:
                raise RepositoryNotFoundError.__new__(RepositoryNotFoundError)
            return self.existing

        def upload_folder(api, *, repo_id, folder_path, revision=None, commit_message=None, **kwargs):
            from pathlib import Path
            files = sorted(p.name for p in Path(folder_path).iterdir())
            self.calls.append(('upload_folder', repo_id, files, revision))
            return SimpleNamespace(commit_url=f'https://huggingface.co/{repo_id}/commit/0123')

        for name, fn in dict(whoami=whoami, create_repo=create_repo, list_repo_files=list_repo_files,
                             upload_folder=upload_folder).items():
            monkeypatch.setattr(huggingface_hub.HfApi, name, fn)


def test_upload_through_hub_api(tiny_source, monkeypatch, capsys, caplog):
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    hub = FakeHub()
    hub.install(monkeypatch)
    caplog.set_level(logging.DEBUG)
    code = main(['publish', str(tiny_source.checkpoint), '--repo-id', REPO_ID])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert [c[0] for c in hub.calls] == ['whoami', 'list_repo_files', 'upload_folder']
    assert hub.calls[2][1:] == (REPO_ID, ['README.md', 'config.json', 'model.safetensors'], None)
    assert 'uploaded to' in captured.out
    assert 'cannot be listed as a pretrained tag' in captured.out  # layers differ from the architecture's
    assert TOKEN not in captured.out + captured.err + caplog.text


def test_upload_never_replaces_existing_files(published, monkeypatch):
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    hub = FakeHub(existing=('.gitattributes', 'README.md'))
    hub.install(monkeypatch)
    with pytest.raises(PublishError, match=r"already has \['README.md'\].*--overwrite-hub"):
        check_hub_target(REPO_ID)
    assert [c[0] for c in hub.calls] == ['whoami', 'list_repo_files']
    upload_model_folder(published, check_hub_target(REPO_ID, overwrite=True))
    assert hub.calls[-1][0] == 'upload_folder'
    with pytest.raises(PublishError, match="'acme' cannot create repos under 'other'"):
        check_hub_target('other/name')
    hub.existing = None  # a new repo is created at upload, not before
    target = check_hub_target('team/new')
    assert 'create_repo' not in [c[0] for c in hub.calls]
    upload_model_folder(published, target)
    assert [c[0] for c in hub.calls[-2:]] == ['create_repo', 'upload_folder']
    monkeypatch.delenv('HF_TOKEN')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_TOKEN_PATH', str(published / 'no-token'))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_STORED_TOKENS_PATH', str(published / 'no-tokens'))
    with pytest.raises(PublishError, match='Not logged in'):
        check_hub_target(REPO_ID)


def _publish_fails(source, tmp_path, capsys, checkpoint, *extra):
    out = tmp_path / 'out'
    code = main(['publish', str(checkpoint), '--repo-id', REPO_ID, '--dry-run', '--out', str(out), *extra])
    assert code == 2
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith('.out')]
    return capsys.readouterr().err


def test_bad_checkpoint_files(source, tmp_path, capsys):
    assert 'does not exist' in _publish_fails(source, tmp_path, capsys, tmp_path / 'missing.pth', '--model',
                                              'tcnn_resnet50rs')
    corrupt = tmp_path / 'corrupt.pth.tar'
    corrupt.write_bytes(source.checkpoint.read_bytes()[:1000])
    assert 'corrupt' in _publish_fails(source, tmp_path, capsys, corrupt, '--model', 'tcnn_resnet50rs')
    corrupt_st = tmp_path / 'corrupt.safetensors'
    corrupt_st.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": nonsense}')
    assert 'safetensors' in _publish_fails(source, tmp_path, capsys, corrupt_st, '--model', 'tcnn_resnet50rs')
    pickled = tmp_path / 'module.pth'
    torch.save(torch.nn.Linear(2, 2), pickled)  # a pickled module, never unpickled
    assert 'not loaded for safety' in _publish_fails(source, tmp_path, capsys, pickled, '--model', 'tcnn_resnet50rs')
    not_tensors = tmp_path / 'not_tensors.pth'
    torch.save({'weights': 'none', 'lr': 0.1}, not_tensors)
    assert 'not a state dict' in _publish_fails(source, tmp_path, capsys, not_tensors, '--model', 'tcnn_resnet50rs')


def test_bad_options_fail_before_building(source, tmp_path, capsys):
    ckpt = source.checkpoint
    err = _publish_fails(source, tmp_path, capsys, ckpt, '--model', 'tcnn_resnet101rs')
    assert 'trained tcnn_resnet50rs' in err and '--model tcnn_resnet50rs' in err
    assert 'trained 3 classes' in _publish_fails(source, tmp_path, capsys, ckpt, '--num-classes', '5')
    assert 'Unknown T-CNN options' in _publish_fails(source, tmp_path, capsys, ckpt, '--model-kwargs', 'tcnn_x=1')
    assert 'top1' in _publish_fails(source, tmp_path, capsys, ckpt, '--results', str(source.root / 'robustness.json'))
    (tmp_path / 'out').mkdir()
    out = tmp_path / 'out'
    code = main(['publish', str(ckpt), '--repo-id', REPO_ID, '--dry-run', '--out', str(out)])
    assert code == 2 and 'already exists' in capsys.readouterr().err and not any(out.iterdir())
    assert main(['publish', str(ckpt), '--repo-id', 'no-org', '--dry-run', '--out', str(tmp_path / 'o')]) == 2
    assert 'ORG/NAME' in capsys.readouterr().err


def test_nan_weights_rejected(tiny_source, tmp_path, capsys):
    state_dict = dict(tiny_source.model.state_dict())
    state_dict['layer4.0.conv2.qk.weight'] = state_dict['layer4.0.conv2.qk.weight'].clone()
    state_dict['layer4.0.conv2.qk.weight'][0, 0] = float('nan')
    ckpt = tmp_path / 'nan.pth'
    torch.save(state_dict, ckpt)
    err = _publish_fails(tiny_source, tmp_path, capsys, ckpt, '--args', str(tiny_source.root / 'args.yaml'))
    assert 'NaN or Inf' in err and 'layer4.0.conv2.qk.weight' in err


def test_mismatches_named():
    def tiny(**kwargs):
        return timm.create_model('tcnn_resnet50rs', layers=(1, 1, 1, 1), **kwargs)

    state_dict = tiny(num_classes=3).state_dict()
    with pytest.raises(InputError, match='It has 3 classes, this model 5'):
        check_weights(state_dict, tiny(num_classes=5))
    with pytest.raises(InputError, match=r'another architecture than tcnn_resnet50rs \(0 entries only in the '
                                           r'checkpoint.*No registered T-CNN has this architecture'):
        check_weights(state_dict, timm.create_model('tcnn_resnet50rs', num_classes=3))
    with pytest.raises(InputError, match=r'Converted layers differ.*only in model \[.layer3.0.conv2.\]'):
        check_weights(state_dict, tiny(num_classes=3, tcnn_stages=(3, 4)))
    with pytest.raises(PublishError, match='no attention parameters'):
        check_weights(timm.create_model('resnetrs50', layers=(1, 1, 1, 1), num_classes=3).state_dict(),
                      tiny(num_classes=3))


def test_train_py_checkpoint_with_args_namespace(tmp_path):
    ckpt = tmp_path / 'model_best.pth.tar'
    torch.save({'state_dict': {'fc.bias': torch.zeros(3)}, 'args': argparse.Namespace(model='tcnn_resnet50rs')}, ckpt)
    assert torch.equal(load_checkpoint_state_dict(ckpt)['fc.bias'], torch.zeros(3))


def test_card_never_writes_an_empty_field(published):
    """train.py's args.yaml holds interpolation '' (unset): the CNN's own interpolation is recorded instead."""
    text = (published / 'README.md').read_text()
    line = next(line for line in text.splitlines() if line.startswith('- **Preprocessing:**'))
    assert 'bicubic interpolation' in line and get_pretrained_cfg('resnetrs50').interpolation == 'bicubic'
    assert json.loads((published / 'config.json').read_text())['pretrained_cfg']['interpolation'] == 'bicubic'
    facts = '\n'.join(line for line in text.splitlines() if line.startswith('- **'))
    assert not re.search(r'(\*\* *,|, *,|: *$|None)', facts, re.M)


def _publish_from(tiny_source, folder, train_args):
    """Publish the tiny checkpoint with `train_args` as its args.yaml; returns (config.json, README.md front matter,
    README.md)."""
    folder.mkdir()
    args_file = folder / 'args.yaml'
    base = dict(model='tcnn_resnet50rs', num_classes=3, model_kwargs=dict(layers=[1, 1, 1, 1]), img_size=64)
    args_file.write_text(yaml.safe_dump({**base, **train_args}))
    out = folder / 'out'
    assert main(['publish', str(tiny_source.checkpoint), '--repo-id', REPO_ID, '--dry-run', '--out', str(out),
                 '--args', str(args_file)]) == 0
    text = (out / 'README.md').read_text()
    return json.loads((out / 'config.json').read_text()), yaml.safe_load(text.split('---\n')[1]), text


def test_provenance_of_a_local_start(tiny_source, tmp_path):
    """A run started from a local CNN file (--pretrained-path or --initial-checkpoint) names that file and its
    hash, never the Hub weights of the architecture's default tag."""
    cnn = tmp_path / 'my_cnn.pth'
    torch.save(timm.create_model('resnetrs50', layers=(1, 1, 1, 1)).state_dict(), cnn)
    digest = hashlib.sha256(cnn.read_bytes()).hexdigest()
    starts = {'pretrained_path': dict(pretrained=True, pretrained_path=str(cnn), initial_checkpoint=''),
              'initial_checkpoint': dict(pretrained=False, pretrained_path=None, initial_checkpoint=str(cnn))}
    for name, train_args in starts.items():
        config, meta, text = _publish_from(tiny_source, tmp_path / name, train_args)
        assert config['pretrained_cfg']['notes'] == [
            f'T-CNN converted from the local file my_cnn.pth (sha256 {digest}) and fine-tuned.']
        assert 'base_model' not in meta and 'resnetrs50.tf_in1k' not in text + json.dumps(config)
        assert f'the local file `my_cnn.pth` (sha256 `{digest}`, not on the Hub)' in text


def test_provenance_of_hub_and_random_starts(tiny_source, tmp_path):
    _, meta, _ = _publish_from(tiny_source, tmp_path / 'hub', dict(pretrained=True, model='tcnn_resnet50rs.tf_in1k'))
    assert meta['base_model'] == 'timm/resnetrs50.tf_in1k' and meta['base_model_relation'] == 'finetune'
    config, meta, text = _publish_from(tiny_source, tmp_path / 'random', dict(pretrained=False))
    assert 'base_model' not in meta and 'trained from a random initialisation' in text
    assert config['pretrained_cfg']['notes'] == ['T-CNN trained from a random initialisation.']


@pytest.mark.parametrize('train_args, message', [
    (dict(pretrained=True, pretrained_path='/gone/cnn.pth'),
     'names /gone/cnn.pth as the weights the run started from, but it is not on this machine: pass --base-weights'),
    (dict(), 'Where the fine-tuning started is not known'),
])
def test_unknown_provenance_is_refused(tiny_source, tmp_path, capsys, train_args, message):
    args_file = tmp_path / 'args.yaml'
    args_file.write_text(yaml.safe_dump(dict(model='tcnn_resnet50rs', num_classes=3,
                                             model_kwargs=dict(layers=[1, 1, 1, 1]), **train_args)))
    assert _publish_fails(tiny_source, tmp_path, capsys, tiny_source.checkpoint, '--args', str(args_file)) \
        .count(message) == 1
