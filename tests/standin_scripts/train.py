""" Stand-in for timm's train.py in the experiment tests: same options and outputs, no training.

Builds the model as train.py does (timm_tcnn registered by `timm-tcnn run`; --initial-checkpoint loaded strictly by
timm's `load_checkpoint`), and
for each epoch opens the content gates a little and writes `last.pth.tar`, `model_best.pth.tar` (train.py's
checkpoint layout) and a summary.csv row. Validation top-1 is a known function of model, seed and epoch:
50 + seed + epoch for the CNN, 52 + 2 * seed + epoch for the T-CNN, 40 + seed + epoch for a model trained from
scratch (neither --initial-checkpoint nor --pretrained). Fails when STANDIN_FAIL names the model.
Records its command line in STANDIN_LOG (one JSON line per run) and, in STANDIN_TIMES, when it ran (a JSON line at its
end: run, first epoch, start and end times, SLURM job id).
"""
import argparse
import ast
import csv
import json
import os
import sys
import time
from pathlib import Path

import timm
import torch
import yaml

parser = argparse.ArgumentParser()
parser.add_argument('--config', default='')
for name in ('--data-dir', '--train-split', '--val-split', '--model', '--initial-checkpoint', '--output',
             '--experiment', '--device', '--resume'):
    parser.add_argument(name, default='')
parser.add_argument('--pretrained', action='store_true')
parser.add_argument('--model-kwargs', nargs='*', default=[])
for name in ('--seed', '--checkpoint-hist', '--img-size', '--num-classes', '--epochs', '--batch-size'):
    parser.add_argument(name, type=int)
args = parser.parse_args()
started = time.time()
if os.environ.get('STANDIN_LOG'):
    with open(os.environ['STANDIN_LOG'], 'a') as f:
        f.write(json.dumps(dict(script='train', argv=sys.argv[1:])) + '\n')
if os.environ.get('STANDIN_FAIL') == args.model:
    sys.exit('stand-in train.py: failing as asked')
recipe = yaml.safe_load(Path(args.config).read_text())
epochs = args.epochs or recipe['epochs']
kwargs = {k: ast.literal_eval(v) for k, v in (item.split('=', 1) for item in args.model_kwargs)}
model = timm.create_model(args.model, num_classes=args.num_classes, checkpoint_path=args.initial_checkpoint, **kwargs)
out = Path(args.output) / args.experiment
out.mkdir(parents=True, exist_ok=True)
start = 0
if args.resume:
    checkpoint = torch.load(args.resume, weights_only=True)
    model.load_state_dict(checkpoint['state_dict'])
    start = checkpoint['epoch'] + 1
if not (args.initial_checkpoint or args.pretrained):
    base = 40 + args.seed
else:
    base = 50 + args.seed if args.model.startswith('resnet') else 52 + 2 * args.seed
for epoch in range(start, epochs):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith('content_gate'):
                param.add_(0.01)
    top1 = base + epoch
    state = dict(epoch=epoch, arch=args.model, state_dict=model.state_dict(), metric=top1)
    for filename in ('last.pth.tar', 'model_best.pth.tar'):
        torch.save(state, out / f'.{filename}.tmp')
        os.replace(out / f'.{filename}.tmp', out / filename)
    summary = out / 'summary.csv'
    new = not summary.exists()
    with open(summary, 'a', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr'])
        if new:
            writer.writeheader()
        writer.writerow(dict(epoch=epoch, train_loss=1.0, eval_loss=1.0, eval_top1=top1, eval_top5=100, lr=0.001))
    time.sleep(float(os.environ.get('STANDIN_EPOCH_SECONDS', '0')))
if os.environ.get('STANDIN_TIMES'):
    with open(os.environ['STANDIN_TIMES'], 'a') as f:
        f.write(
            json.dumps(
                dict(
                    script='train',
                    run=args.experiment,
                    start_epoch=start,
                    started=started,
                    ended=time.time(),
                    job=os.environ.get('SLURM_JOB_ID'),
                )
            )
            + '\n'
        )
