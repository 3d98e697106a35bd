""" Model cards (the Hub's README.md) for published T-CNN checkpoints, and the result files they report.

A card has YAML front matter the Hub and timm understand (`library_name: timm`, tags, license, datasets,
`base_model` = the Hub weights the fine-tuning started from, if it started from Hub weights) and sections:
what the model is (and where its fine-tuning started), its conversion,
the training recipe (from train.py's `args.yaml`), evaluation results (validate.py `--results-file`
CSV or JSON), robustness results (any JSON object), how to load it, and the citation.
"""
import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from huggingface_hub import ModelCardData

from ..errors import InputError
from ..models.variants import variant
from ..utils.io import read_mapping
from .publish import StartWeights

__all__ = ['ModelCardInfo', 'read_validate_results', 'read_robustness_results', 'render_model_card']

TCNN_CITATION = """@article{dascoli2021transformed,
  title={Transformed CNNs: recasting pre-trained convolutional layers with self-attention},
  author={d'Ascoli, St{\\'e}phane and Sagun, Levent and Biroli, Giulio and Morcos, Ari},
  journal={arXiv preprint arXiv:2106.05795},
  year={2021}
}"""

RESNETRS_CITATION = """@article{bello2021revisiting,
  title={Revisiting ResNets: Improved Training and Scaling Strategies},
  author={Bello, Irwan and Fedus, William and Du, Xianzhi and Cubuk, Ekin D. and Srinivas, Aravind and
          Lin, Tsung-Yi and Shlens, Jonathon and Zoph, Barret},
  journal={arXiv preprint arXiv:2103.07579},
  year={2021}
}"""

# train.py arguments shown as the training recipe, in this order (paths and run names are left out)
RECIPE_KEYS = (
    'dataset', 'train_split', 'num_classes', 'pretrained', 'epochs', 'batch_size', 'grad_accum_steps',
    'opt', 'lr', 'lr_base', 'momentum', 'weight_decay', 'layer_decay', 'clip_grad', 'sched', 'warmup_epochs',
    'warmup_lr', 'min_lr', 'cooldown_epochs', 'img_size', 'input_size', 'train_img_sizes', 'crop_pct',
    'scale', 'ratio', 'hflip', 'aa', 'reprob', 'mixup', 'cutmix', 'smoothing', 'drop', 'drop_path',
    'model_ema', 'model_ema_decay', 'amp', 'amp_dtype', 'channels_last', 'seed', 'model_kwargs',
)
_RESULT_COLUMNS = (('top1', 'top-1 (%)'), ('top5', 'top-5 (%)'), ('img_size', 'image size'),
                   ('crop_pct', 'crop'), ('interpolation', 'interpolation'), ('param_count', 'params (M)'))


@dataclass
class ModelCardInfo:
    """Everything a card reports. `results` pairs a label (e.g. 'imagenet val') with a validate.py row."""
    repo_id: str
    architecture: str
    start: StartWeights  # where the fine-tuning started
    model_args: Dict[str, Any]
    pretrained_cfg: Dict[str, Any]
    param_count: int
    attention_layers: List[str]
    checkpoint: str  # source file name
    ema: bool = False
    license: str = 'apache-2.0'
    datasets: Sequence[str] = ('imagenet-1k',)
    train_args: Optional[Dict[str, Any]] = None
    results: Sequence[Tuple[str, Dict[str, Any]]] = ()
    robustness: Optional[Dict[str, Any]] = None
    tag: Optional[str] = None
    extra_tags: Sequence[str] = field(default_factory=tuple)


def _number(text: str) -> Union[int, float, str]:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def read_validate_results(path: Union[str, Path]) -> List[Dict[str, Any]]:
    """Rows of a validate.py `--results-file` (CSV, or JSON with `--results-format json`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f'Results file {path} does not exist.')
    text = path.read_text(encoding='utf-8')
    if path.suffix.lower() == '.json':
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f'Results file {path} is not valid JSON: {e}') from None
        rows = [rows] if isinstance(rows, dict) else rows
    else:
        rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(text.splitlines())]
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and 'top1' in r for r in rows):
        raise InputError(
            f'Results file {path} is not a validate.py results file: expected rows with a top1 column '
            f'(validate.py --results-file FILE [--results-format json]).')
    return rows


def read_robustness_results(path: Union[str, Path]) -> Dict[str, Any]:
    """A robustness results JSON object (e.g. from `timm-tcnn robustness`); its numbers are tabulated as given."""
    return read_mapping(path, 'Robustness results')


def _flatten(results: Mapping[str, Any], prefix: str = '') -> List[Tuple[str, Any]]:
    """(dotted key, value) of every number, string or bool; lists are left out."""
    rows = []
    for key, value in results.items():
        if isinstance(value, Mapping):
            rows.extend(_flatten(value, f'{prefix}{key}.'))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            rows.append((f'{prefix}{key}', value))
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return 'n/a' if math.isnan(value) else f'{value:.4g}'
    if isinstance(value, (list, tuple)):
        return ' x '.join(str(v) for v in value) if all(isinstance(v, int) for v in value) else str(list(value))
    return 'n/a' if value is None else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(_fmt(v).replace('|', '\\|') for v in row) + ' |' for row in rows]
    return '\n'.join(lines)


def _front_matter(info: ModelCardInfo) -> str:
    data = ModelCardData(
        tags=['image-classification', 'timm', 'timm-tcnn', 'transformed-cnn', 'self-attention', *info.extra_tags],
        library_name='timm',
        pipeline_tag='image-classification',
        license=info.license,
        datasets=list(info.datasets),
        base_model=info.start.hub_id,
        base_model_relation='finetune' if info.start.hub_id else None,
    )
    return f'---\n{data.to_yaml()}\n---\n'


def _is_resnetrs(info: ModelCardInfo) -> bool:
    return variant(info.architecture).cnn.startswith('resnetrs')


def _start(start: StartWeights) -> str:
    if start.hub_id:
        return f'[{start.hub_id}](https://huggingface.co/{start.hub_id}), converted then fine-tuned'
    if start.file:
        return f'the local file `{start.file}` (sha256 `{start.sha256}`, not on the Hub), converted then fine-tuned'
    return 'none: trained from a random initialisation'


def _preprocessing(cfg: Mapping[str, Any]) -> str:
    """Crop, interpolation, mean and std: those the cfg sets (an empty field is never written)."""
    parts = [(f'crop {cfg.get("crop_pct")}', cfg.get('crop_pct')),
             (f'{cfg.get("interpolation")} interpolation', cfg.get('interpolation')),
             (f'mean {_fmt(cfg.get("mean"))}', cfg.get('mean')), (f'std {_fmt(cfg.get("std"))}', cfg.get('std'))]
    return ', '.join(text for text, value in parts if value not in (None, '', [], ())) or 'timm defaults'


def _details(info: ModelCardInfo) -> str:
    cfg = info.pretrained_cfg
    stages = ', '.join(str(s) for s in info.model_args.get('tcnn_stages', ()))
    train_size = _fmt(list(cfg['input_size'][1:]))
    test_size = _fmt(list(cfg.get('test_input_size', cfg['input_size'])[1:]))
    resnetrs = '; [Revisiting ResNets](https://arxiv.org/abs/2103.07579)' if _is_resnetrs(info) else ''
    lines = [
        f'- **Architecture:** `{info.architecture}` (timm-tcnn, from timm\'s `{variant(info.architecture).cnn}`)',
        f'- **Base model:** {_start(info.start)}',
        f'- **Classes:** {info.model_args.get("num_classes", cfg.get("num_classes"))}',
        f'- **Params (M):** {info.param_count / 1e6:.2f}',
        f'- **Attention layers:** {len(info.attention_layers)} (stage{"s" if "," in stages else ""} {stages})',
        f'- **Image size:** train {train_size}, test {test_size}',
        f'- **Preprocessing:** {_preprocessing(cfg)}',
        f'- **Dataset:** {", ".join(info.datasets)}',
        '- **Papers:** [Transformed CNNs: recasting pre-trained convolutional layers with self-attention]'
        f'(https://arxiv.org/abs/2106.05795){resnetrs}',
    ]
    return '\n'.join(lines)


def _conversion(info: ModelCardInfo) -> str:
    options = [(f'`{k}`', json.dumps(v)) for k, v in info.model_args.items() if k.startswith('tcnn_')]
    weights = 'its EMA weights' if info.ema else 'its weights'
    source = f'`{info.start.hub_id}`' if info.start.hub_id else info.start.describe()
    return (
        f'The T-CNN was built from {source}: the spatial convolutions of the listed stages were replaced '
        f'by gated positional self-attention initialised to compute exactly what the convolutions compute '
        f'(content and Gaussian-locality gates at 0), then the whole network was fine-tuned. This repository '
        f'holds {weights} from `{info.checkpoint}`. `config.json` records every conversion option, so the '
        f'architecture rebuilds the same way whatever later versions choose as defaults:\n\n'
        + _table(('option', 'value'), options)
        + '\n\nConverted layers: ' + ', '.join(f'`{n}`' for n in info.attention_layers)
    )


def _recipe(train_args: Optional[Dict[str, Any]]) -> str:
    if not train_args:
        return 'No training arguments were recorded with this checkpoint.'
    rows = [(f'`{k}`', train_args[k]) for k in RECIPE_KEYS if train_args.get(k) not in (None, '', [], {})]
    return ("Fine-tuned with timm's `train.py` (with `--device-modules timm_tcnn`); arguments from the run's "
            '`args.yaml`:\n\n' + _table(('argument', 'value'), rows))


def _results(results: Sequence[Tuple[str, Dict[str, Any]]]) -> str:
    if not results:
        return 'Not evaluated yet.'
    rows = [(label, *(row.get(key) for key, _ in _RESULT_COLUMNS)) for label, row in results]
    return ("Measured with timm's `validate.py`:\n\n"
            + _table(('evaluation', *(title for _, title in _RESULT_COLUMNS)), rows))


def _usage(info: ModelCardInfo) -> str:
    tag_line = ''
    if info.tag:
        tag_line = (f"\n# once listed in timm-tcnn's registry of published weights:\n"
                    f"# model = timm.create_model('{info.architecture}.{info.tag}', pretrained=True)\n")
    return (
        '```python\n'
        'import timm\n'
        'import timm_tcnn  # pip install timm-tcnn; registers the T-CNN architectures with timm\n'
        'from PIL import Image\n\n'
        f"model = timm.create_model('hf-hub:{info.repo_id}', pretrained=True).eval()\n"
        f'{tag_line}'
        'data_config = timm.data.resolve_model_data_config(model)\n'
        'transform = timm.data.create_transform(**data_config, is_training=False)\n'
        "image = Image.open('image.jpg').convert('RGB')\n"
        'top5_prob, top5_idx = model(transform(image).unsqueeze(0)).softmax(-1).topk(5)\n'
        '```\n\n'
        "timm's scripts need the plugin imported first: "
        f'`timm-tcnn run validate.py --model hf-hub:{info.repo_id} ...` (or `train.py --device-modules timm_tcnn`).'
    )


def render_model_card(info: ModelCardInfo) -> str:
    """README.md text: YAML front matter, then Markdown sections."""
    name = info.repo_id.split('/')[-1]
    sections = [
        _front_matter(info),
        f'# Model card for {name}\n',
        f'A Transformed CNN (T-CNN) image classifier: timm\'s `{variant(info.architecture).cnn}` recast with gated '
        f'positional self-attention in its late stages and fine-tuned (d\'Ascoli et al., 2021). Loads with timm once '
        f'the `timm-tcnn` package is imported.\n',
        '## Model details\n\n' + _details(info) + '\n',
        '## Conversion\n\n' + _conversion(info) + '\n',
        '## Training recipe\n\n' + _recipe(info.train_args) + '\n',
        '## Evaluation\n\n' + _results(info.results) + '\n',
    ]
    if info.robustness:
        sections.append('## Robustness\n\n' + _table(('metric', 'value'), _flatten(info.robustness)) + '\n')
    sections += [
        '## How to use\n\n' + _usage(info) + '\n',
        '## Citation\n\n```bibtex\n' + TCNN_CITATION + '\n```\n'
        + ('\n```bibtex\n' + RESNETRS_CITATION + '\n```\n' if _is_resnetrs(info) else ''),
    ]
    return '\n'.join(sections)
