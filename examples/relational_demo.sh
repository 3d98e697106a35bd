#!/usr/bin/env bash
# The CPU demonstration of docs/experiments.md, end to end: the relational-shapes data, a small CNN trained on
# it with timm's train.py (standing in for ImageNet pretraining), then `timm-tcnn experiment` with 3 seeds.
#
#   TIMM_SCRIPTS_DIR=/path/to/pytorch-image-models bash examples/relational_demo.sh [OUT]
#
# A rerun reuses the data and the CNN and resumes the experiment where it stopped.
set -euo pipefail
out=${1:-output/relational_demo}
here=$(cd "$(dirname "$0")" && pwd)
scripts=${TIMM_SCRIPTS_DIR:?set TIMM_SCRIPTS_DIR to a clone of https://github.com/huggingface/pytorch-image-models}
start=$(date +%s)

if [ ! -f "$out/data/dataset.json" ]; then
    timm-tcnn relational-shapes --out "$out/data" --train-images 6000 --val-images 500 --size 64
fi
if [ ! -f "$out/pretrain/cnn/model_best.pth.tar" ]; then
    timm-tcnn run "$scripts/train.py" --config "$here/relational_shapes_pretrain.yaml" --data-dir "$out/data" \
        --output "$out/pretrain" --experiment cnn
fi
echo "data and CNN: $(( $(date +%s) - start )) s"

timm-tcnn experiment --model tcnn_resnet18 --data-dir "$out/data" --out "$out/experiment" \
    --cnn-checkpoint "$out/pretrain/cnn/model_best.pth.tar" --config "$here/relational_shapes_ft.yaml" \
    --model-kwargs "channels=(32,64,128,256)" --tcnn-kwargs "tcnn_stages=(2,)" "tcnn_qk_dim=16" --num-classes 10 \
    --train-size 64 --test-size 64 --seeds 0 1 2 --scripts-dir "$scripts" \
    --corruptions gaussian_noise defocus_blur contrast jpeg_compression --severities 3 --analyze-images 16
echo "demonstration: $(( $(date +%s) - start )) s in total; report: $out/experiment/report.md"
