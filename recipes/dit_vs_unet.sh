#!/usr/bin/env bash
# Our class-conditional DiT against the diffusers course's class-conditioned UNet on Fashion-MNIST,
# at equal CPU minutes: recipes/fashion_mnist.sh trains ours for STEPS steps, then the UNet
# (recipes/unet_baseline.py) trains for the seconds that took, on the same shards; both sample
# 20 steps of DPM-Solver++ and are scored by FID / KID on the same FID_N images against the same
# reference. Run it on one core (taskset -c 1) so that both see the same machine.
#   RUN=runs/dvu STEPS=900 FID_N=500 bash recipes/dit_vs_unet.sh
set -euo pipefail
RUN=${RUN:-runs/dit-vs-unet}
export RUN STEPS=${STEPS:-900} FID_N=${FID_N:-500}
here=$(dirname "$0")
mkdir -p "$RUN"
bash "$here/fashion_mnist.sh" 2>&1 | tee "$RUN/dit.log"
seconds=$(sed -n 's/^\[recipe\] denoiser: \([0-9]*\) s.*/\1/p' "$RUN/dit.log" | tail -n 1)
[ -n "$seconds" ] || { echo "error: no denoiser time in $RUN/dit.log" >&2; exit 1; }

. "$here/stage.sh"
stage unet python "$here/unet_baseline.py" train --data "$RUN/shards" --out "$RUN/unet" --seconds "$seconds"
stage unet-grid python "$here/unet_baseline.py" grid --model "$RUN/unet" --out "$RUN/unet_grid.png"
stage unet-fid python "$here/unet_baseline.py" fid --model "$RUN/unet" --reference "$RUN/shards" --n "$FID_N" \
  --out "$RUN/unet_fid"
