""" Gate trajectories of T-CNN fine-tunes under several gate learning-rate scales and gradient floors.

Fine-tunes the same CNN checkpoint as a T-CNN with timm's train.py once per setting (same recipe, seed and
data), records the gates after every epoch from train.py's checkpoints, and prints per setting the mean and
largest content share, the mean locality share and alpha, and the final validation top-1; `--cnn` adds the
CNN fine-tuned with the same recipe as the reference. On data with label parts (`timm-tcnn relational-shapes`),
`--img-size` also gives each run's accuracy per label part and pair distance. Everything goes to OUT/sweep.json.

    python examples/gate_rate_sweep.py --scripts-dir pytorch-image-models --data-dir DATA \
        --model tcnn_resnet18 --cnn-checkpoint cnn.pth.tar --config examples/relational_shapes_ft.yaml \
        --settings 1:0 30:0 30:0.1 --img-size 64 --out sweep \
        -- --model-kwargs "channels=(32,64,128,256)" "tcnn_stages=(2,)"

Arguments after `--` go to train.py (model kwargs are merged with the setting's options).
"""
import argparse
import ast
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from timm_tcnn.tools.experiment.parts import evaluate_parts, load_image_groups, load_label_parts
from timm_tcnn.tools.experiment.report import read_summary
from timm_tcnn.tools.experiment.runner import EpochRecorder


def _train(args: argparse.Namespace, name: str, model: str, kwargs: list, out: Path) -> dict:
    run_dir = out / 'train' / name
    argv = [sys.executable, '-m', 'timm_tcnn', 'run', str(Path(args.scripts_dir) / 'train.py'),
            '--config', args.config, '--data-dir', args.data_dir, '--model', model,
            '--initial-checkpoint', args.cnn_checkpoint, '--seed', str(args.seed), '--output', str(out / 'train'),
            '--experiment', name, '--checkpoint-hist', '1', '--device', args.device, *args.train_args]
    if args.img_size:
        argv += ['--img-size', str(args.img_size)]
    if kwargs:
        argv += ['--model-kwargs', *kwargs]
    recorder = EpochRecorder(run_dir, gates=out / 'gates' / f'{name}.json')
    start = time.time()
    with open(out / f'{name}.log', 'w') as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        while process.poll() is None:
            recorder.poll()
            time.sleep(1.)
    recorder.poll()
    if process.returncode:
        raise SystemExit(f'{name}: train.py failed, see {out / f"{name}.log"}')
    epochs = read_summary(run_dir / 'summary.csv')
    result = dict(gates=recorder.records, top1=[row['eval_top1'] for row in epochs], seconds=time.time() - start)
    label_parts = load_label_parts(args.data_dir)
    if label_parts and args.img_size:
        model_kwargs = {k: ast.literal_eval(v) for k, v in (item.split('=', 1) for item in kwargs)}
        result['parts'] = evaluate_parts(
            model, str(run_dir / 'last.pth.tar'), str(Path(args.data_dir) / 'validation'), label_parts,
            args.img_size, load_image_groups(args.data_dir, 'validation'), num_classes=len(label_parts),
            **model_kwargs)['accuracy']
    return result


def _describe(name: str, result: dict) -> str:
    line = f'{name:<18} top-1 per epoch {[round(t, 1) for t in result["top1"]]}  ({result["seconds"]:.0f} s)'
    if 'parts' in result:
        line += '\n    last epoch, % per label part: ' + ', '.join(f'{k} {v:.1f}' for k, v in result['parts'].items())
    for epoch, layers in sorted(result['gates'].items(), key=lambda kv: int(kv[0])):
        if not layers:  # a CNN has no gates
            continue
        content = [s for layer in layers.values() for s in layer['content_share']]
        locality = [s for layer in layers.values() for s in layer['locality_share']]
        alpha = [a for layer in layers.values() for a in layer['alpha']]
        line += (f'\n    epoch {epoch}: content share mean {statistics.fmean(content):.3f} max {max(content):.3f} '
                 f'open heads {sum(c > 0 for c in content)}/{len(content)}; locality share mean '
                 f'{statistics.fmean(locality):.3f}; alpha mean {statistics.fmean(alpha):.3f}')
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--scripts-dir', required=True)
    parser.add_argument('--data-dir', required=True)
    parser.add_argument('--model', required=True, help='the T-CNN')
    parser.add_argument('--cnn', help='also fine-tune this CNN (the control) with the same recipe')
    parser.add_argument('--cnn-checkpoint', required=True)
    parser.add_argument('--config', required=True)
    parser.add_argument('--settings', nargs='+', default=['1:0', '30:0', '30:0.1'],
                        help='GATE_LR_SCALE:GRAD_FLOOR pairs')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--img-size', type=int, help='train.py --img-size, and the size of the accuracy per label part')
    parser.add_argument('--out', required=True)
    parser.add_argument('train_args', nargs='*')
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # --model-kwargs of the pass-through arguments are merged with each setting's options
    base_kwargs = []
    if '--model-kwargs' in args.train_args:
        i = args.train_args.index('--model-kwargs')
        j = next((k for k in range(i + 1, len(args.train_args)) if args.train_args[k].startswith('--')),
                 len(args.train_args))
        base_kwargs, args.train_args = args.train_args[i + 1:j], args.train_args[:i] + args.train_args[j:]
    results = {}
    if args.cnn:
        cnn_kwargs = [k for k in base_kwargs if not k.startswith('tcnn_')]
        results['cnn'] = _train(args, 'cnn', args.cnn, cnn_kwargs, out)
        print(_describe('cnn', results['cnn']), flush=True)
    for setting in args.settings:
        scale, floor = setting.split(':')
        name = f'scale{scale}-floor{floor}'
        kwargs = base_kwargs + [f'tcnn_gate_lr_scale={float(scale)}', f'tcnn_grad_floor={float(floor)}']
        results[name] = _train(args, name, args.model, kwargs, out)
        print(_describe(name, results[name]), flush=True)
    (out / 'sweep.json').write_text(json.dumps(results, indent=1) + '\n')


if __name__ == '__main__':
    main()
