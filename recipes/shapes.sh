#!/usr/bin/env bash
# Reproduce the packaged `shapes` model on a 2-core CPU: autoencoder -> shards -> denoiser ->
# a second cosine cycle from its weights on more scenes -> a third on fresh scenes (seed 1) ->
# export (fp16, to $RUN/model) -> alignment on the held-out split.
# CYCLE3_STEPS=0 stops after the second cycle, CYCLE2_STEPS=0 after the first.
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
N3=${N3:-40000}
CYCLE3_STEPS=${CYCLE3_STEPS:-1500}
EVAL_N=${EVAL_N:-64}
DEST=${DEST:-$RUN/model}  # never the packaged weights unless asked for
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

. "$(dirname "$0")/stage.sh"  # stage NAME CMD ...: run one stage and print its time

stage autoencoder latentdit train-ae --preset shapes-fast --out "$RUN/ae" --steps "$AE_STEPS" --no-progress
stage preprocess latentdit preprocess --source shapes --n "$N" --out "$RUN/shards" --autoencoder "$RUN/ae/autoencoder" \
  --max-length 24 --shard-size 2048 --batch-size 128 --no-progress
stage denoiser latentdit train --preset shapes-small --data "$RUN/shards" --out "$RUN/train" --steps "$STEPS" \
  --resume latest --no-progress
# A later cycle: fine-tune FROM with a fresh warm-up and cosine decay on N scenes of SEED.
cycle() {  # cycle NAME FROM N SEED STEPS
  stage "preprocess$1" latentdit preprocess --source shapes --n "$3" --seed "$4" --out "$RUN/shards$1" \
    --autoencoder "$RUN/ae/autoencoder" --max-length 24 --shard-size 2048 --batch-size 128 --no-progress
  stage "cycle$1" latentdit train --preset shapes-small --data "$RUN/shards$1" --out "$RUN/train$1" --init_from "$2" \
    --steps "$5" --optim.lr 4e-4 --optim.warmup_steps 50 --resume latest --no-progress
}
if [ "$CYCLE2_STEPS" -gt 0 ]; then
  stage export latentdit export --run "$RUN/train" --out "$RUN/cycle1" --fp16
  cycle 2 "$RUN/cycle1" "$N2" 0 "$CYCLE2_STEPS"
  if [ "$CYCLE3_STEPS" -gt 0 ]; then
    stage export2 latentdit export --run "$RUN/train2" --out "$RUN/cycle2" --fp16
    cycle 3 "$RUN/cycle2" "$N3" 1 "$CYCLE3_STEPS"
    stage export3 latentdit export --run "$RUN/train3" --out "$DEST" --fp16
  else
    stage export2 latentdit export --run "$RUN/train2" --out "$DEST" --fp16
  fi
else
  stage export latentdit export --run "$RUN/train" --out "$DEST" --fp16
fi
stage eval latentdit eval alignment --model "$DEST" --split heldout --n "$EVAL_N" --samples 4 --out "$RUN/eval"
