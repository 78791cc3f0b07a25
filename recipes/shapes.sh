#!/usr/bin/env bash
# Reproduce the packaged `shapes` model on a 2-core CPU: autoencoder -> shards -> denoiser ->
# export (fp16, into the package) -> alignment on the held-out split.
#   bash recipes/shapes.sh            # RUN=runs/shapes N=30000 by default
# Every stage resumes where it stopped if the script is run again.
set -euo pipefail
RUN=${RUN:-runs/shapes}
N=${N:-30000}
AE_STEPS=${AE_STEPS:-3600}
STEPS=${STEPS:-2000}
DEST=${DEST:-latentdit/weights/shapes}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

latentdit train-ae --preset shapes-fast --out "$RUN/ae" --steps "$AE_STEPS" --no-progress
latentdit preprocess --source shapes --n "$N" --out "$RUN/shards" --autoencoder "$RUN/ae/autoencoder" \
  --max-length 24 --shard-size 2048 --batch-size 128 --no-progress
latentdit train --preset shapes-small --data "$RUN/shards" --out "$RUN/train" --steps "$STEPS" \
  --resume latest --no-progress
latentdit export --run "$RUN/train" --out "$DEST" --fp16
latentdit eval alignment --model "$DEST" --split heldout --n 64 --samples 4 --out "$RUN/eval"
