#!/usr/bin/env bash
# Reproduce the packaged `shapes` model on a 2-core CPU: autoencoder -> shards -> denoiser ->
# a second cosine cycle from its weights on more scenes -> export (fp16, to $RUN/model) ->
# alignment on the held-out split. CYCLE2_STEPS=0 stops after the first cycle.
#   bash recipes/shapes.sh            # RUN=runs/shapes N=30000 by default
#   DEST=latentdit/weights/shapes bash recipes/shapes.sh   # replace the packaged model on purpose
# Each stage prints its wall-clock time ([recipe] lines).
# Every stage resumes where it stopped if the script is run again.
set -euo pipefail
RUN=${RUN:-runs/shapes}
N=${N:-30000}
AE_STEPS=${AE_STEPS:-3600}
STEPS=${STEPS:-2700}
N2=${N2:-40000}
CYCLE2_STEPS=${CYCLE2_STEPS:-2600}
EVAL_N=${EVAL_N:-64}
DEST=${DEST:-$RUN/model}  # never the packaged weights unless asked for
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

. "$(dirname "$0")/stage.sh"  # stage NAME CMD ...: run one stage and print its time

stage autoencoder latentdit train-ae --preset shapes-fast --out "$RUN/ae" --steps "$AE_STEPS" --no-progress
stage preprocess latentdit preprocess --source shapes --n "$N" --out "$RUN/shards" --autoencoder "$RUN/ae/autoencoder" \
  --max-length 24 --shard-size 2048 --batch-size 128 --no-progress
stage denoiser latentdit train --preset shapes-small --data "$RUN/shards" --out "$RUN/train" --steps "$STEPS" \
  --resume latest --no-progress
if [ "$CYCLE2_STEPS" -gt 0 ]; then
  stage export latentdit export --run "$RUN/train" --out "$RUN/cycle1" --fp16
  stage preprocess2 latentdit preprocess --source shapes --n "$N2" --out "$RUN/shards2" \
    --autoencoder "$RUN/ae/autoencoder" --max-length 24 --shard-size 2048 --batch-size 128 --no-progress
  stage cycle2 latentdit train --preset shapes-small --data "$RUN/shards2" --out "$RUN/train2" --init_from "$RUN/cycle1" \
    --steps "$CYCLE2_STEPS" --optim.lr 4e-4 --optim.warmup_steps 50 --resume latest --no-progress
  stage export2 latentdit export --run "$RUN/train2" --out "$DEST" --fp16
else
  stage export latentdit export --run "$RUN/train" --out "$DEST" --fp16
fi
stage eval latentdit eval alignment --model "$DEST" --split heldout --n "$EVAL_N" --samples 4 --out "$RUN/eval"
