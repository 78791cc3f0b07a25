#!/usr/bin/env bash
# Reproduce the packaged `shapes` model on a 2-core CPU: autoencoder -> shards -> denoiser ->
# export (fp16, into the package) -> alignment on the held-out split.
#   bash recipes/shapes.sh            # RUN=runs/shapes N=40000 by default
# Every stage resumes where it stopped if the script is run again.
set -euo pipefail
RUN=${RUN:-runs/shapes}
N=${N:-40000}
AE_STEPS=${AE_STEPS:-1500}
STEPS=${STEPS:-4000}
DEST=${DEST:-latentdit/weights/shapes}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

latentdit train-ae --out "$RUN/ae" --steps "$AE_STEPS" --no-progress
latentdit preprocess --source shapes --n "$N" --out "$RUN/shards" --autoencoder "$RUN/ae/autoencoder" \
  --max-length 24 --shard-size 2048 --no-progress
latentdit train --preset shapes-small --data "$RUN/shards" --out "$RUN/train" --steps "$STEPS" \
  --model.max_text_len 24 --resume latest --no-progress
latentdit export --run "$RUN/train" --out "$DEST" --fp16
latentdit eval alignment --model "$DEST" --split heldout --n 64 --samples 4 --out "$RUN/eval"
