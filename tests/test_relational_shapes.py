""" The relational-shapes generator (determinism, labels, pair distances, dataset.json) and the accuracy per
label part and image group, against counts made by hand from dataset.json. """
import json
from collections import Counter

import numpy as np
import pytest
import torch
from timm.data import ImageDataset

from timm_tcnn.errors import InputError
from timm_tcnn.tools.experiment.parts import load_image_groups, load_label_parts, part_accuracy
from timm_tcnn.tools.relational_shapes import DOT_COLORS, FAR_DISTANCE, class_names, render, write_dataset


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp('relational') / 'data'
    write_dataset(root, seed=3, train_images=22, val_images=40, size=64)
    return root


def test_render_is_deterministic_and_seeded():
    a, b, c = render(0, 'train', 5), render(0, 'train', 5), render(1, 'train', 5)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert (a.class_name, a.pair, a.dot_distance) == (b.class_name, b.pair, b.dot_distance)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_labels_and_pair_distances():
    samples = [render(0, 'validation', i, size=64) for i in range(200)]
    near = [s.dot_distance for s in samples if s.pair == 'near']
    far = [s.dot_distance for s in samples if s.pair == 'far']
    assert max(near) < 8 and min(far) >= FAR_DISTANCE * 64
    counts = Counter((s.relation, s.pair) for s in samples)
    assert all(25 <= counts[key] <= 75 for key in [('same', 'near'), ('same', 'far'), ('different', 'near'),
                                                   ('different', 'far')])
    assert {s.class_name for s in samples} == set(class_names())


def test_dots_have_the_labelled_colours():
    """The relation read back from the pixels: the palette colours present among the dot pixels."""
    for i in range(30):
        sample = render(2, 'train', i, size=128)
        pixels = np.asarray(sample.image, dtype=np.float32)
        found = {k for k, color in enumerate(DOT_COLORS)
                 if (np.linalg.norm(pixels - np.array(color, dtype=np.float32), axis=-1) < 60).sum() >= 12}
        # a main shape can be drawn in a palette-like colour too; only a single dot colour proves `same`
        if len(found) == 1:
            assert sample.relation == 'same'
        if sample.relation == 'different':
            assert len(found) >= 2


def test_dataset_json_lists_parts_and_groups(dataset):
    info = json.loads((dataset / 'dataset.json').read_text())
    assert info['classes'] == class_names() and info['size'] == 64
    groups = load_image_groups(str(dataset), 'validation')
    assert len(groups) == 40 and set(groups.values()) <= {'near', 'far'}
    for file in groups:
        assert (dataset / 'validation' / file).is_file()
    assert len(load_image_groups(str(dataset), 'train')) == 22
    assert load_label_parts(str(dataset))['ring_same'] == {'shape': 'ring', 'relation': 'same'}


class _Constant(torch.nn.Module):
    """Predicts one class for every image (timm's data config comes from `default_cfg`)."""
    default_cfg = dict(input_size=(3, 64, 64), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0, interpolation='bilinear')

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.full((x.shape[0],), self.index), 10).float()


def test_part_accuracy_per_group_matches_hand_count(dataset):
    label_parts = load_label_parts(str(dataset))
    groups = load_image_groups(str(dataset), 'validation')
    predicted = 'disk_same'
    result = part_accuracy(_Constant(class_names().index(predicted)), str(dataset / 'validation'), label_parts, 64,
                           groups, batch_size=16)
    truth = {file: label_parts[file.split('/')[0]] for file in groups}
    for group in ('near', 'far'):
        files = [f for f, g in groups.items() if g == group]
        same = sum(truth[f]['relation'] == 'same' for f in files)
        disks = sum(truth[f]['shape'] == 'disk' for f in files)
        assert result['accuracy'][f'relation ({group})'] == pytest.approx(100 * same / len(files))
        assert result['accuracy'][f'shape ({group})'] == pytest.approx(100 * disks / len(files))
        assert result['images_per_group'][f'relation ({group})'] == len(files)
    assert result['accuracy']['relation'] == pytest.approx(
        100 * sum(t['relation'] == 'same' for t in truth.values()) / 40)
    assert result['chance'] == {'relation': 50, 'shape': 20, 'relation (far)': 50, 'relation (near)': 50,
                                'shape (far)': 20, 'shape (near)': 20}
    assert result['images'] == 40


def test_counts_leaving_a_class_without_images_are_refused(tmp_path):
    """Seed 0's first 10 validation images miss 3 classes: refused, with the smallest count found from the images
    themselves; at that count both splits have every class, numbered alike by ImageFolder."""
    needed = next(n for n in range(1, 500)
                  if {render(0, 'validation', i).class_name for i in range(n)} == set(class_names()))
    with pytest.raises(InputError, match=rf'--val-images 10 leaves 3 classes .* use --val-images {needed} or more'):
        write_dataset(tmp_path / 'short', seed=0, train_images=100, val_images=10)
    assert not (tmp_path / 'short').exists()
    write_dataset(tmp_path / 'data', seed=0, train_images=100, val_images=needed, size=64)
    splits = [ImageDataset(str(tmp_path / 'data' / split)).reader.class_to_idx for split in ('train', 'validation')]
    assert splits[0] == splits[1] == {name: i for i, name in enumerate(class_names())}
