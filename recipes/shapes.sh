#!/usr/bin/env bash
# Reproduce the packaged `shapes` model on a 2-core CPU: autoencoder -> shards -> denoiser ->
# export (fp16, to $RUN/model) -> alignment on the held-out split.
#   bash recipes/shapes.sh            # RUN=runs/shapes N=30000 by default
#   DEST=latentdit/weights/shapes bash recipes/shapes.sh   # replace the packaged model on purpose
# Each stage prints its wall-clock time ([recipe] lines).
# Every stage resumes where it stopped if the script is run again.
set -euo pipefail
RUN=${RUN:-runs/shapes}
N=${N:-30000}
AE_STEPS=${AE_STEPS:-3600}
STEPS=${STEPS:-2700}
EVAL_N=${EVAL_N:-64}
DEST=${DEST:-$RUN/model}  # never the packaged weights unless asked for
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

. "$(dirname "$0")/stage.sh"  # stage NAME CMD ...: run one stage and print its time

stage autoencoder latentdit train-ae --preset shapes-fast --out "$RUN/ae" --steps "$AE_STEPS" --no-progress
stage preprocess latentdit preprocess --source shapes --n "$N" --out "$RUN/shards" --autoencoder "$RUN/ae/autoencoder" \
  --max-length 24 --shard-size 2048 --batch-size 128 --no-progress
stage denoiser latentdit train --preset shapes-small --data "$RUN/shards" --out "$RUN/train" --steps "$STEPS" \
  --resume latest --no-progress
stage export latentdit export --run "$RUN/train" --out "$DEST" --fp16
stage eval latentdit eval alignment --model "$DEST" --split heldout --n "$EVAL_N" --samples 4 --out "$RUN/eval"
