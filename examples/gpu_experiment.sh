#!/usr/bin/env bash
# The CPU demonstration's experiments at the paper's length, for one GPU: the relational-shapes data, a small CNN
# trained with timm's train.py (its weights kept after every epoch), then one `timm-tcnn experiment` from the CNN
# after 4 of its 11 epochs with all three arms and 3 seeds:
#   - tcnn against cnn: both fine-tuned 50 epochs from the partially trained CNN (the paper's first claim);
#   - tcnn against scratch: the T-CNN from scratch for 4 + 50 epochs with the CNN's recipe (its second claim),
#     with each route's training time.
#
#   TIMM_SCRIPTS_DIR=/path/to/pytorch-image-models bash examples/gpu_experiment.sh [OUT]
#
# Settings through the environment: EPOCHS (50), SEEDS ("0 1 2"), DEVICE (cuda), WORKERS (8), BATCH (32, the CPU
# recipe's), DRY_RUN=1 (print the experiment's commands; data and CNN are still made). Budget: about 10 minutes on
# one H200 by estimate (about 1.5 s per epoch of 187 steps, host-bound); not yet measured on a GPU.
# A rerun reuses the data and the CNN and resumes the experiment where it stopped.
set -euo pipefail
out=${1:-output/gpu_experiment}
here=$(cd "$(dirname "$0")" && pwd)
scripts=${TIMM_SCRIPTS_DIR:?set TIMM_SCRIPTS_DIR to a clone of https://github.com/huggingface/pytorch-image-models}
epochs=${EPOCHS:-50}
seeds=${SEEDS:-0 1 2}
device=${DEVICE:-cuda}
workers=${WORKERS:-8}
batch=${BATCH:-32}
start=$(date +%s)

if [ ! -f "$out/data/dataset.json" ]; then
    timm-tcnn relational-shapes --out "$out/data" --train-images 6000 --val-images 500 --size 64
fi
if [ ! -f "$out/pretrain/cnn/checkpoint-3.pth.tar" ]; then
    timm-tcnn run "$scripts/train.py" --config "$here/relational_shapes_pretrain.yaml" --data-dir "$out/data" \
        --output "$out/pretrain" --experiment cnn --checkpoint-hist 11 --device "$device" --workers "$workers"
fi
echo "data and CNN: $(( $(date +%s) - start )) s"

# shellcheck disable=SC2086  # seeds are words
timm-tcnn experiment --model tcnn_resnet18 --data-dir "$out/data" --out "$out/experiment" \
    --cnn-checkpoint "$out/pretrain/cnn/checkpoint-3.pth.tar" --config "$here/relational_shapes_ft.yaml" \
    --arms tcnn cnn scratch --epochs "$epochs" --seeds $seeds --device "$device" --workers "$workers" \
    --model-kwargs "channels=(32,64,128,256)" --tcnn-kwargs "tcnn_stages=(2,)" "tcnn_qk_dim=16" --num-classes 10 \
    --train-size 64 --test-size 64 --scripts-dir "$scripts" \
    --corruptions gaussian_noise defocus_blur contrast jpeg_compression --severities 3 --analyze-images 16 \
    ${DRY_RUN:+--dry-run} -- --workers "$workers" --batch-size "$batch"
echo "GPU experiment: $(( $(date +%s) - start )) s in total; report: $out/experiment/report.md"
