#!/usr/bin/env bash
# Make the packaged `shapes-layout` model: the packaged `shapes` model with a layout planner grown on
# it (--model.layout_planner true) and trained alone (--train_only 'planner.*') on scenes with
# grounding boxes. Every other weight stays the base's, so the result ships as a small delta.
# grounded shards -> planner training -> fp16 export -> delta on the base -> held-out alignment.
#   bash recipes/shapes_layout.sh   # RUN=runs/layout N=40000 STEPS=1000 by default (about 10 minutes
#                                   # of training on two threads, 5 of preprocessing on one core)
# Each stage prints its wall-clock time ([recipe] lines); every stage resumes if run again.
set -euo pipefail
RUN=${RUN:-runs/layout}
N=${N:-40000}
SEED=${SEED:-12}  # scenes the base never trained on
STEPS=${STEPS:-1000}
GAIN=${GAIN:-1.5}  # how far the denoiser follows the plan (the gains stay where they start)
BASE=${BASE:-shapes}
AE=${AE:-latentdit/weights/shapes/vae}  # the base's autoencoder
EVAL_N=${EVAL_N:-256}
DEST=${DEST:-$RUN/model}  # never the packaged weights unless asked for
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

. "$(dirname "$0")/stage.sh"  # stage NAME CMD ...: run one stage and print its time

stage preprocess latentdit preprocess --source shapes --grounding --n "$N" --seed "$SEED" --out "$RUN/shards" \
  --autoencoder "$AE" --max-length 24 --shard-size 2048 --batch-size 128 --no-progress
stage planner latentdit train --preset shapes-small --init_from "$BASE" --model.layout_planner true \
  --model.layout_gain "$GAIN" --train_only 'planner.*' --layout_weight 1 --data "$RUN/shards" \
  --out "$RUN/train" --steps "$STEPS" --optim.lr 1e-3 --optim.warmup_steps 50 --resume latest --no-progress
stage export latentdit export --run "$RUN/train" --out "$RUN/whole" --fp16
[ -d "$DEST" ] || stage delta latentdit delta "$RUN/whole" --base "$BASE" --out "$DEST"
stage eval latentdit eval alignment --model "$DEST" --split heldout --n "$EVAL_N" --samples 4 --out "$RUN/eval"
