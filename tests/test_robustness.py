""" `timm-tcnn robustness`: label mapping, per-cell counts, CE/mCE arithmetic, A/R masks, resume, bad trees. """
import json
import os
import sys

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image
from safetensors.torch import save_file

import timm_tcnn.tools.robustness.run as run_module
from timm_tcnn.cli import main
from timm_tcnn.tools.robustness import (
    ALEXNET_ERRORS,
    CORRUPTIONS,
    CorruptImage,
    imagenet_class_to_idx,
    masked_predictions,
    scan_imagenet_c,
    subset_indices,
    summarize_imagenet_c,
)
from helpers import randomize_batchnorm

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # resnet18's timm data config
SYNSETS = {'n01440764': 0, 'n01443537': 1, 'n15075141': 999}  # tench, goldfish, toilet tissue
SIZE = 32
KWARGS = ['--model-kwargs', 'layers=(1,1,1,1)']  # a one-block-per-stage resnet18 keeps the tests fast


def _to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float (N, 3, H, W), written out independently of timm's transforms."""
    x = torch.from_numpy(images.copy()).permute(0, 3, 1, 2).float() / 255.
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _random_images(n: int, generator: np.random.Generator) -> np.ndarray:
    """Smooth random images (N, SIZE, SIZE, 3) uint8: upsampled noise, so predictions vary between images."""
    coarse = generator.integers(0, 256, (n, 5, 5, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(c).resize((SIZE, SIZE), Image.BILINEAR)) for c in coarse])


@pytest.fixture(scope='module')
def cnn(tmp_path_factory):
    """Random-weight resnet18 with one block per stage (1000 classes, random BatchNorm statistics) and its
    safetensors checkpoint."""
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=1000, layers=(1, 1, 1, 1))
    model = randomize_batchnorm(model, torch.Generator().manual_seed(0))
    model.eval()
    path = tmp_path_factory.mktemp('ckpt') / 'resnet18.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, str(path)


def _write_class_images(folder, model, generator, n=6):
    """Write n images into synset folders of `folder`: even ones under the class the model predicts
    (so accuracies are not trivially 0), odd ones under one of SYNSETS."""
    images = _random_images(n, generator)
    with torch.no_grad():
        predicted = model(_to_input(images)).argmax(1).tolist()
    names = list(imagenet_class_to_idx())
    for i, image in enumerate(images):
        synset = names[predicted[i]] if i % 2 == 0 else list(SYNSETS)[i % 3]
        os.makedirs(folder / synset, exist_ok=True)
        Image.fromarray(image).save(folder / synset / f'img_{i}.png')


@pytest.fixture(scope='module')
def imagenet_c(tmp_path_factory, cnn):
    """gaussian_noise with severities 1-5, fog with 1-2 only, plus malformed parts."""
    model, _ = cnn
    root = tmp_path_factory.mktemp('imagenet_c')
    generator = np.random.default_rng(0)
    for corruption, severities in (('gaussian_noise', range(1, 6)), ('fog', (1, 2))):
        for severity in severities:
            _write_class_images(root / corruption / str(severity), model, generator)
    (root / 'not_a_corruption' / '1' / 'n01440764').mkdir(parents=True)  # unknown corruption name
    (root / 'fog' / '7').mkdir()  # not a severity
    (root / 'fog' / '3' / 'n01440764').mkdir(parents=True)  # empty cell
    (root / 'gaussian_noise' / '1' / 'n01440764' / 'readme.txt').write_text('not an image')
    (root / 'gaussian_noise' / '2' / 'n01440764' / 'broken.JPEG').write_bytes(b'not a jpeg')
    return root


def _independent_cell_count(model, cell_root):
    """(correct, total) of `model` on every readable image under cell_root/<synset>/, counted here."""
    mapping = imagenet_class_to_idx()
    images, targets = [], []
    for synset in sorted(os.listdir(cell_root)):
        for name in sorted(os.listdir(cell_root / synset)):
            if name.endswith('.png'):
                images.append(np.asarray(Image.open(cell_root / synset / name).convert('RGB')))
                targets.append(mapping[synset])
    with torch.no_grad():
        predicted = model(_to_input(np.stack(images))).argmax(1)
    return int((predicted == torch.tensor(targets)).sum()), len(targets)


def _run(capsys, *args):
    code = main(['robustness', *map(str, args), '--workers', '0', '--batch-size', '8'])
    out, err = capsys.readouterr()
    return code, out, err


def _load(output):
    with open(output / 'robustness.json') as f:
        return json.load(f)


def test_label_mapping_is_timm_synset_order(imagenet_c):
    mapping = imagenet_class_to_idx()
    assert len(mapping) == 1000
    assert all(mapping[s] == i for s, i in SYNSETS.items())
    scan = scan_imagenet_c(str(imagenet_c), mapping)
    for samples in scan.cells.values():
        for path, target in samples:
            assert SYNSETS.get(os.path.basename(os.path.dirname(path)), target) == target
            assert mapping[os.path.basename(os.path.dirname(path))] == target


def test_subset_masks_match_timm_index_files():
    info = os.path.join(os.path.dirname(timm.data.__file__), '_info')
    synsets = open(os.path.join(info, 'imagenet_synsets.txt')).read().split()
    for name, stem in (('imagenet-a', 'imagenet_a'), ('imagenet-r', 'imagenet_r')):
        expected = [int(x) for x in open(os.path.join(info, f'{stem}_indices.txt')).read().split()]
        indices = subset_indices(name)
        assert indices == expected and len(indices) == 200
        assert [synsets[i] for i in indices] == open(os.path.join(info, f'{stem}_synsets.txt')).read().split()
    indices = subset_indices('imagenet-a')
    logits = torch.randn(16, 1000)
    logits[:, 0] = 100.  # class 0 (tench) is not in ImageNet-A: the unmasked argmax, never the masked one
    expected = []
    for row in logits:
        best = max(indices, key=lambda i: row[i].item())
        expected.append(best)
    assert 0 not in indices
    assert masked_predictions(logits, indices).tolist() == expected
    assert masked_predictions(logits, None).tolist() == [0] * 16


def test_mce_arithmetic_by_hand():
    errors = {'gaussian_noise': [0.5, 0.6, 0.7, 0.8, 0.9], 'fog': [0.2, 0.3, 0.4, 0.5, 0.6]}
    accuracies = {c: {s + 1: 1 - e for s, e in enumerate(v)} for c, v in errors.items()}
    summary = summarize_imagenet_c(accuracies, clean_accuracy=0.7)
    # CE = sum of errors / (5 x AlexNet mean error); relative CE subtracts clean errors (0.3, AlexNet's 0.43478)
    ce_noise, ce_fog = 3.5 / (5 * 0.886428), 2.0 / (5 * 0.819324)
    rel_noise, rel_fog = (3.5 - 1.5) / (5 * (0.886428 - 0.43478)), (2.0 - 1.5) / (5 * (0.819324 - 0.43478))
    assert summary['corruptions']['gaussian_noise']['ce'] == pytest.approx(ce_noise, abs=1e-12)
    assert summary['corruptions']['fog']['ce'] == pytest.approx(ce_fog, abs=1e-12)
    assert summary['mce'] == pytest.approx((ce_noise + ce_fog) / 2, abs=1e-12)
    assert summary['relative_mce'] == pytest.approx((rel_noise + rel_fog) / 2, abs=1e-12)
    assert summary['mean_corruption_accuracy'] == pytest.approx(1 - 5.5 / 10, abs=1e-12)
    assert summary['partial'] and summary['complete_corruptions'] == 2

    # all 15 at error 0.5: mCE = mean of 0.5 / AlexNet error; not partial
    full = summarize_imagenet_c({c: {s: 0.5 for s in range(1, 6)} for c in CORRUPTIONS})
    assert full['mce'] == pytest.approx(sum(0.5 / ALEXNET_ERRORS[c] for c in CORRUPTIONS) / 15, abs=1e-12)
    assert not full['partial'] and full['relative_mce'] is None

    # a corruption with missing severities gets no CE and does not enter the mCE
    partial = summarize_imagenet_c({'fog': {1: 0.5, 2: 0.5}, 'gaussian_noise': accuracies['gaussian_noise']})
    assert 'ce' not in partial['corruptions']['fog'] and partial['mce'] == pytest.approx(ce_noise, abs=1e-12)


def test_imagenet_c_cells_equal_independent_count_and_resume(imagenet_c, cnn, tmp_path, capsys, monkeypatch):
    model, checkpoint = cnn
    output = tmp_path / 'out'
    code, out, err = _run(capsys, 'resnet18', *KWARGS, '--checkpoint', checkpoint, '--imagenet-c', imagenet_c,
                          '--clean-accuracy', 70, '--out', output)
    assert code == 0, err
    entry, = _load(output)['models'].values()
    cells = entry['cells']
    expected_keys = {f'imagenet-c/gaussian_noise/{s}' for s in range(1, 6)} | {'imagenet-c/fog/1', 'imagenet-c/fog/2'}
    assert set(cells) == expected_keys
    for key, cell in cells.items():
        _, corruption, severity = key.split('/')
        correct, total = _independent_cell_count(model, imagenet_c / corruption / severity)
        assert (cell['correct'], cell['total']) == (correct, total), key
        assert cell['top1'] == pytest.approx(correct / total)
    assert 0 < sum(c['correct'] for c in cells.values()) < sum(c['total'] for c in cells.values())
    assert cells['imagenet-c/gaussian_noise/2']['unreadable'] == 1

    summary = entry['summary']['imagenet-c']
    noise_errors = [1 - cells[f'imagenet-c/gaussian_noise/{s}']['top1'] for s in range(1, 6)]
    assert summary['corruptions']['gaussian_noise']['ce'] == pytest.approx(sum(noise_errors) / (5 * 0.886428))
    assert 'ce' not in summary['corruptions']['fog'] and summary['partial']
    assert summary['mce'] == summary['corruptions']['gaussian_noise']['ce']
    assert summary['relative_mce'] == pytest.approx((sum(noise_errors) - 5 * 0.3) / (5 * (0.886428 - 0.43478)))
    for message in ('not_a_corruption', 'not severities 1..5', 'severities 3, 4, 5 missing', 'hold no images',
                    'non-image file', 'could not be read', '13 of the 15 benchmark corruptions absent'):
        assert message in err, message
    assert 'PARTIAL' in out and 'mCE' in out
    assert (output / 'robustness.csv').read_text().count('\n') == 1 + len(expected_keys)
    assert (output / 'robustness.png').read_bytes().startswith(b'\x89PNG')

    # a rerun evaluates nothing; a cell removed from the results is the only one evaluated again
    calls = []
    original = run_module.count_top1
    monkeypatch.setattr(run_module, 'count_top1', lambda *a, **k: calls.append(k['desc']) or original(*a, **k))
    before = _load(output)
    code, out, _ = _run(capsys, 'resnet18', *KWARGS, '--checkpoint', checkpoint, '--imagenet-c', imagenet_c,
                        '--clean-accuracy', 70, '--out', output)
    assert code == 0 and calls == [] and '7 cell(s) already' in out
    assert _load(output)['models'][entry['fingerprint']['id']]['cells'] == before['models'][
        entry['fingerprint']['id']]['cells']
    data = _load(output)
    del data['models'][entry['fingerprint']['id']]['cells']['imagenet-c/fog/2']
    (output / 'robustness.json').write_text(json.dumps(data))
    code, _, _ = _run(capsys, 'resnet18', *KWARGS, '--checkpoint', checkpoint, '--imagenet-c', imagenet_c,
                      '--clean-accuracy', 70, '--out', output)
    assert code == 0 and calls == ['resnet18 imagenet-c/fog/2']
    assert _load(output)['models'][entry['fingerprint']['id']]['cells'] == before['models'][
        entry['fingerprint']['id']]['cells']


def test_imagenet_a_uses_the_200_class_mask(tmp_path, cnn, capsys):
    model, checkpoint = cnn
    indices = subset_indices('imagenet-a')
    names = list(imagenet_class_to_idx())
    root = tmp_path / 'imagenet_a'
    generator = np.random.default_rng(1)
    images = _random_images(8, generator)
    with torch.no_grad():
        logits = model(_to_input(images))
    masked = [indices[j] for j in logits[:, indices].argmax(1).tolist()]  # what each image is predicted as
    for i, image in enumerate(images):
        target = masked[i] if i % 2 == 0 else indices[i]
        os.makedirs(root / names[target], exist_ok=True)
        Image.fromarray(image).save(root / names[target] / f'{i}.png')
    os.makedirs(root / 'n01440764')  # tench: a 1k class outside ImageNet-A
    Image.fromarray(images[0]).save(root / 'n01440764' / 'x.png')
    expected = sum(masked[i] == (masked[i] if i % 2 == 0 else indices[i]) for i in range(8))
    # the same folder as a validation set: all 1000 logits, tench included
    targets = [masked[i] if i % 2 == 0 else indices[i] for i in range(8)] + [0]
    unmasked = logits.argmax(1).tolist() + [logits[0].argmax().item()]
    expected_val = sum(p == t for p, t in zip(unmasked, targets))
    code, out, err = _run(capsys, 'resnet18', *KWARGS, '--checkpoint', checkpoint, '--imagenet-a', root,
                          '--imagenet-val', root, '--img-size', SIZE, '--crop-pct', 1.0, '--out', tmp_path / 'out')
    assert code == 0, err
    cells = next(iter(_load(tmp_path / 'out')['models'].values()))['cells']
    assert (cells['imagenet-a']['correct'], cells['imagenet-a']['total']) == (expected, 8)
    assert (cells['imagenet-val']['correct'], cells['imagenet-val']['total']) == (expected_val, 9)
    assert 'outside the evaluated class subset' in err and 'ImageNet-A top-1' in out


def test_corrupt_on_the_fly_and_compare_cnn_with_its_tcnn(tmp_path, cnn, capsys):
    pytest.importorskip('imagecorruptions')
    model, _ = cnn
    folder = tmp_path / 'folder'
    _write_class_images(folder, model, np.random.default_rng(2), n=4)
    small = dict(layers=(1, 1, 1, 1))
    torch.manual_seed(0)
    rs = randomize_batchnorm(timm.create_model('resnetrs50', **small), torch.Generator().manual_seed(1))
    checkpoint = tmp_path / 'resnetrs.safetensors'
    save_file({k: v.contiguous() for k, v in rs.state_dict().items()}, str(checkpoint))
    kwargs = ['layers=(1,1,1,1)']
    args = ['tcnn_resnet50rs', '--checkpoint', checkpoint, '--model-kwargs', *kwargs,
            '--compare', 'resnetrs50', '--compare-checkpoint', checkpoint, '--compare-model-kwargs', *kwargs,
            '--corrupt', folder, '--corruptions', 'gaussian_noise', 'impulse_noise', '--severities', 1, 5,
            '--corrupt-size', 32, '--out', tmp_path / 'out']
    code, out, err = _run(capsys, *args)
    assert code == 0, err
    entries = list(_load(tmp_path / 'out')['models'].values())
    assert [e['fingerprint']['model'] for e in entries] == ['tcnn_resnet50rs', 'resnetrs50']
    keys = {'corrupt/clean/0'} | {f'corrupt/{c}/{s}' for c in ('gaussian_noise', 'impulse_noise') for s in (1, 5)}
    assert set(entries[0]['cells']) == set(entries[1]['cells']) == keys
    # the freshly converted T-CNN computes the CNN's function: identical counts, differences 0
    for key in keys:
        assert entries[0]['cells'][key]['correct'] == entries[1]['cells'][key]['correct']
        assert entries[0]['cells'][key]['total'] == 4
    assert 'vs resnetrs50' in out and '+0.00' in out and 'mean corruption accuracy' in out

    # the corrupted images depend only on the seed, the corruption, the severity and the image index
    image = Image.open(next(folder.glob('*/*.png')))
    for name in ('gaussian_noise', 'impulse_noise'):
        first, again = (np.asarray(CorruptImage(name, 5, 32, seed=0)(image, 3)) for _ in range(2))
        assert first.shape == (32, 32, 3) and (first == again).all()
        assert not (first == np.asarray(CorruptImage(name, 5, 32, seed=0)(image, 4))).all()
        assert not (first == np.asarray(CorruptImage(name, 5, 32, seed=1)(image, 3))).all()


@pytest.mark.parametrize('args, message', [
    (['--imagenet-c', 'MISSING'], 'not a directory'),
    (['--imagenet-c', 'EMPTY'], 'no ImageNet-C cells found'),
    ([], 'nothing to evaluate'),
    (['--imagenet-c', 'EMPTY', '--corruptions', 'sunburn'], 'unknown corruption(s) sunburn'),
    (['--imagenet-c', 'EMPTY', '--severities', '0'], 'severities must be in 1..5'),
    (['--imagenet-val', 'EMPTY'], 'no labelled images found'),
    (['--imagenet-c', 'EMPTY', '--clean-accuracy', '180'], 'percentage in [0, 100]'),
    (['--imagenet-val', 'EMPTY', '--compare', 'resnet50'], 'resnet50 has no weights'),
])
def test_bad_input_gives_clear_errors(tmp_path, capsys, args, message):
    (tmp_path / 'EMPTY').mkdir()
    args = [str(tmp_path / a) if a in ('MISSING', 'EMPTY') else a for a in args]
    code, _, err = _run(capsys, 'resnet18', '--checkpoint', tmp_path / 'none.pth', *args, '--out', tmp_path / 'out')
    assert code == 2 and message in err and 'error:' in err
    assert not (tmp_path / 'out' / 'robustness.json').exists()


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path, imagenet_c, capsys):
    path = tmp_path / 'other.safetensors'
    save_file({'weight': torch.zeros(3)}, str(path))
    code, _, err = _run(capsys, 'resnet18', *KWARGS, '--checkpoint', path, '--imagenet-c', imagenet_c,
                        '--out', tmp_path / 'out')
    assert code == 2 and 'does not fit resnet18' in err and "only in the checkpoint, e.g. ['weight']" in err


def test_broken_imagecorruptions_is_reported_before_evaluation(tmp_path, cnn, capsys, monkeypatch):
    _, checkpoint = cnn
    folder = tmp_path / 'folder' / 'n01440764'
    folder.mkdir(parents=True)
    Image.new('RGB', (40, 40)).save(folder / 'a.png')
    monkeypatch.setitem(sys.modules, 'imagecorruptions', None)  # import fails, as the unmaintained 1.1.2 does
    code, _, err = _run(capsys, 'resnet18', *KWARGS, '--checkpoint', checkpoint, '--corrupt', tmp_path / 'folder',
                        '--out', tmp_path / 'out')
    assert code == 2 and 'pip install imagecorruptions-imaug' in err
    assert not (tmp_path / 'out').exists()
