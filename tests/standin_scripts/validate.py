""" Stand-in for timm's validate.py in the experiment tests: reports the top-1 the stand-in train.py stored in
the checkpoint, minus 1 at a size other than 64 px, in validate.py's --results-file JSON layout. Records its command
line
in STANDIN_LOG and when it ran in STANDIN_TIMES. """
import argparse
import json
import os
import sys
import time

import torch

parser = argparse.ArgumentParser()
for name in ('--data-dir', '--split', '--model', '--checkpoint', '--device', '--results-file', '--results-format'):
    parser.add_argument(name, default='')
parser.add_argument('--model-kwargs', nargs='*', default=[])
for name in ('--img-size', '--batch-size', '--workers', '--num-classes'):
    parser.add_argument(name, type=int)
args = parser.parse_args()
started = time.time()
if os.environ.get('STANDIN_LOG'):
    with open(os.environ['STANDIN_LOG'], 'a') as f:
        f.write(json.dumps(dict(script='validate', argv=sys.argv[1:])) + '\n')
checkpoint = torch.load(args.checkpoint, weights_only=True)
top1 = checkpoint['metric'] - (args.img_size != 64)
with open(args.results_file, 'w') as f:
    json.dump(dict(model=args.model, top1=top1, top1_err=100 - top1, img_size=args.img_size), f)
if os.environ.get('STANDIN_TIMES'):
    with open(os.environ['STANDIN_TIMES'], 'a') as f:
        f.write(
            json.dumps(dict(script='validate', checkpoint=args.checkpoint, started=started, ended=time.time())) + '\n'
        )
