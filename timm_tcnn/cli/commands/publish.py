""" `timm-tcnn publish`: a fine-tuned T-CNN checkpoint -> Hugging Face Hub repo (or a local folder). """
import argparse
import json
import tempfile
from pathlib import Path
from typing import List, Tuple

from huggingface_hub.utils import HFValidationError, validate_repo_id

from ...models.convert import attention_layers
from ...models.published import PublishedWeightsError, check_registry_entry, registry_entry
from ...utils.io import check_output_dir
from ...weights.checkpoint import load_checkpoint_state_dict
from ...weights.checks import check_finite
from ...weights.loading import create_model
from ...weights.model_card import ModelCardInfo, read_robustness_results, read_validate_results, render_model_card
from ...weights.publish import (
    PublishError,
    check_hub_target,
    check_weights,
    published_pretrained_cfg,
    read_train_args,
    resolve_model_args,
    start_weights,
    upload_model_folder,
    write_model_folder,
)
from .common import add_output_args, add_weight_args, refuse_unused


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'publish',
        help='publish a fine-tuned T-CNN checkpoint to the Hugging Face Hub (or write the folder only)',
        description='Rebuild the T-CNN of a checkpoint with its options (the run\'s args.yaml or --model-kwargs), '
                    'check that the weights load strictly and are finite, write model.safetensors, config.json '
                    '(every T-CNN option spelt out) and a model card README.md, check that the folder rebuilds '
                    'the same model, then upload it with the Hub login of this machine (`hf auth login` or '
                    'HF_TOKEN). With --dry-run --out DIR nothing is uploaded.',
    )
    parser.add_argument('checkpoint', metavar='CHECKPOINT',
                        help='train.py checkpoint (model_best.pth.tar), plain state dict or .safetensors')
    parser.add_argument('--repo-id', required=True, metavar='ORG/NAME', help='Hub model repo to publish to')
    parser.add_argument('--model', metavar='NAME',
                        help='a registered T-CNN, e.g. tcnn_resnet50rs (default: args.yaml model)')
    parser.add_argument('--args', metavar='FILE',
                        help="the run's train.py args.yaml (default: args.yaml beside the checkpoint, if any)")
    parser.add_argument('--num-classes', type=int, help='class count (default: args.yaml num_classes, else 1000)')
    parser.add_argument('--img-size', type=int, help='train image size (default: args.yaml, else the CNN\'s)')
    parser.add_argument('--test-img-size', type=int, help="recommended test image size (default: the CNN's)")
    parser.add_argument('--crop-pct', type=float, help="test crop fraction (default: args.yaml, else the CNN's)")
    parser.add_argument('--results', action='append', default=[], metavar='[LABEL=]FILE',
                        help='validate.py --results-file (CSV or JSON) for the metrics table; repeatable, '
                             'e.g. "imagenet val=val.csv"')
    parser.add_argument('--robustness', metavar='FILE', help='robustness results JSON object (e.g. mCE, accuracies)')
    parser.add_argument('--dataset', action='append', metavar='NAME',
                        help='Hub dataset id for the card metadata; repeatable (default: imagenet-1k)')
    parser.add_argument('--base-weights', metavar='SOURCE',
                        help='where the fine-tuning started: hf-hub:ORG/NAME, a local FILE (its name and sha256 are '
                             "recorded) or random (default: from args.yaml: train.py's --pretrained-path or "
                             '--initial-checkpoint file, else the Hub weights of --pretrained, else random)')
    parser.add_argument('--license', default='apache-2.0', help='license for the card metadata')
    parser.add_argument('--tag', help="pretrained tag for the printed registry entry (default: from a repo name "
                                      "'ARCH.TAG')")
    add_weight_args(parser, sources=(), model_kwargs_help='T-CNN options as in training, overriding args.yaml, '
                                                          'e.g. tcnn_stages="(3, 4)"')
    add_output_args(parser, 'also keep the folder here')
    parser.add_argument('--dry-run', action='store_true', help='write --out only, upload nothing')
    parser.add_argument('--revision', help='Hub branch to commit to (default: main; created if missing)')
    parser.add_argument('--private', action='store_true', help='create the repo as private')
    parser.add_argument('--overwrite-hub', action='store_true',
                        help='replace files that already exist in the Hub repo at that revision')
    parser.add_argument('--commit-message', default='Add T-CNN weights')
    parser.set_defaults(func=run)


def _results(specs: List[str]) -> List[Tuple[str, dict]]:
    """(label, validate.py row) of every `[LABEL=]FILE`; a file of several rows labels them by model."""
    out = []
    for spec in specs:
        label, sep, path = spec.partition('=')
        label, path = (label, path) if sep else (Path(spec).stem, spec)
        rows = read_validate_results(path)
        out += [(label if len(rows) == 1 else f'{label} ({row.get("model")})', row) for row in rows]
    return out


def _tag(args: argparse.Namespace, arch: str) -> str:
    if args.tag:
        return args.tag
    name = args.repo_id.split('/')[-1]
    return name.split('.', 1)[1] if name.startswith(f'{arch}.') else ''


def run(args: argparse.Namespace) -> int:
    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as e:
        raise PublishError(f'--repo-id {args.repo_id!r} is not a Hub repo id: {e}') from None
    if '/' not in args.repo_id:
        raise PublishError(f'--repo-id must be ORG/NAME (user or organisation, then name), got {args.repo_id!r}.')
    if args.dry_run and not args.out:
        raise PublishError('--dry-run writes the folder only: pass --out DIR.')
    refuse_unused({'--overwrite': args.overwrite and not args.out}, '--out DIR')
    if args.dry_run:
        refuse_unused({'--private': args.private, '--revision': bool(args.revision),
                       '--overwrite-hub': args.overwrite_hub}, 'an upload', 'drop --dry-run')
    if args.out:
        check_output_dir(args.out, args.overwrite)
    target = None if args.dry_run else check_hub_target(args.repo_id, args.revision, args.overwrite_hub)

    # read every small input first, so that a bad one fails before the model is built
    checkpoint = Path(args.checkpoint)
    args_file = Path(args.args) if args.args else checkpoint.parent / 'args.yaml'
    train_args = read_train_args(args_file) if args.args or args_file.is_file() else None
    results = _results(args.results)
    robustness = read_robustness_results(args.robustness) if args.robustness else None
    arch, model_args = resolve_model_args(args.model, train_args, args.model_kwargs, args.num_classes)
    state_dict = load_checkpoint_state_dict(checkpoint, use_ema=args.ema)
    check_finite(state_dict, f'checkpoint {checkpoint}')
    start = start_weights(train_args, args.base_weights)

    cfg = published_pretrained_cfg(
        arch, model_args, start, train_args, args.img_size, args.test_img_size, args.crop_pct, args.license)
    model = create_model(arch, pretrained_cfg=cfg, **model_args)
    check_weights(state_dict, model)
    layers = [name for name, _ in attention_layers(model)]
    tag = _tag(args, arch)
    card = render_model_card(ModelCardInfo(
        repo_id=args.repo_id, architecture=arch, start=start, model_args=model_args,
        pretrained_cfg=cfg, param_count=sum(p.numel() for p in model.parameters()), attention_layers=layers,
        checkpoint=checkpoint.name, ema=args.ema, license=args.license, datasets=args.dataset or ['imagenet-1k'],
        train_args=train_args, results=results, robustness=robustness, tag=tag or None,
    ))
    print(f'{checkpoint} -> {arch} ({model.num_classes} classes, {len(layers)} attention layers, '
          f'{"EMA " if args.ema else ""}weights load strictly and are finite)')

    with tempfile.TemporaryDirectory() as scratch:
        folder = write_model_folder(
            args.out or Path(scratch) / 'model', model, model_args, card, overwrite=args.overwrite)
        print(f'wrote {", ".join(sorted(p.name for p in folder.iterdir()))} to {folder}; the folder rebuilds '
              f'the same logits with timm.create_model("local-dir:{folder}")' if args.out else
              'folder written and checked: it rebuilds the same logits')
        entry = registry_entry(json.loads((folder / 'config.json').read_text()), tag or 'your_tag', args.repo_id)
        if not args.dry_run:
            url = upload_model_folder(folder, target, private=args.private, commit_message=args.commit_message)
            print(f'uploaded to https://huggingface.co/{args.repo_id} ({url}); load with '
                  f'timm.create_model("hf-hub:{args.repo_id}", pretrained=True) after `import timm_tcnn`')

    try:
        check_registry_entry(entry)
        print(f'To list these weights as {arch}.{tag or "your_tag"}, add this entry to '
              f'timm_tcnn/models/published_weights.json (see docs/publishing.md):')
        print(json.dumps(entry, indent=2))
    except PublishedWeightsError as e:
        print(f'These weights cannot be listed as a pretrained tag: {e}')
    return 0

