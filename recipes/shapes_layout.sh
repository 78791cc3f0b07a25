#!/usr/bin/env bash
# Make the packaged `shapes-layout` model: the packaged `shapes` model with a layout planner grown on
# it (--model.layout_planner true) and trained alone (--train_only 'planner.*') on scenes with
# grounding boxes, then a small part of the denoiser (its biases, modulation tables and depthwise
# convolutions) fine-tuned under the planner on counting-heavy scenes whose two or three copies
# never sit in the four corners only (--count-layout distinct). Every other weight stays the
# base's, so the result ships as a small delta. Its sampling config: count contrast and DDPM (docs/shapes-model.md).
# grounded shards -> planner training -> fp16 export -> later planner cycles, each going on from
# the last's export on the same scenes -> counting fine-tune -> delta on the base -> held-out
# alignment.
#   bash recipes/shapes_layout.sh   # RUN=runs/layout N=40000 STEPS=1000 LATER="1000:5e-4 1000:5e-4 1000:5e-4"
#                                   # COUNT=1000
#                                   # (training: about 10 minutes of two threads for the first
#                                   # cycle, 26 of one core for each later one, 53 for the counting
#                                   # fine-tune; preprocessing: 5 minutes of one core per shard set)
# Each stage prints its wall-clock time ([recipe] lines); every stage resumes if run again.
set -euo pipefail
RUN=${RUN:-runs/layout}
N=${N:-40000}
SEED=${SEED:-12}  # scenes the base never trained on
STEPS=${STEPS:-1000}  # the first cycle, at lr 1e-3
LATER=${LATER-1000:5e-4 1000:5e-4 1000:5e-4}  # the later cycles as STEPS:LR; LATER="" stops after the first
COUNT=${COUNT:-1000}  # steps of the denoiser's counting fine-tune, at lr 1e-3; COUNT=0 skips it
COUNT_SEED=${COUNT_SEED:-14}  # its scenes: single, relation and counting scenes 1:1:2
TUNED='blocks.*.mlp.dw.*,blocks.*.bias,blocks.*.table,blocks.*.norm_x.weight'  # what it trains
GAIN=${GAIN:-1.5}  # how far the denoiser follows the plan (the gains stay where they start)
CONTRAST=${CONTRAST:-1.5}  # sampling: counted prompts guided away from one copy more (latentdit.counts)
SAMPLER=${SAMPLER:-ddpm}  # sampling: ancestral steps, each image's noise from its own seed
BASE=${BASE:-shapes}
AE=${AE:-latentdit/weights/shapes/vae}  # the base's autoencoder
EVAL_N=${EVAL_N:-256}
DEST=${DEST:-$RUN/model}  # never the packaged weights unless asked for
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

. "$(dirname "$0")/stage.sh"  # stage NAME CMD ...: run one stage and print its time

stage preprocess latentdit preprocess --source shapes --grounding --n "$N" --seed "$SEED" --out "$RUN/shards" \
  --autoencoder "$AE" --max-length 24 --shard-size 2048 --batch-size 128 --no-progress
planner() {  # planner TAG INIT STEPS LR: train the planner alone, from INIT, into $RUN/train$TAG
  latentdit train --preset shapes-small --init_from "$2" --model.layout_planner true \
    --model.layout_gain "$GAIN" --sampling.count_contrast "$CONTRAST" --sampling.sampler "$SAMPLER" --train_only 'planner.*' --layout_weight 1 \
    --data "$RUN/shards" \
    --out "$RUN/train$1" --steps "$3" --optim.lr "$4" --optim.warmup_steps 50 --resume latest --no-progress
}
stage planner planner "" "$BASE" "$STEPS" 1e-3
stage export latentdit export --run "$RUN/train" --out "$RUN/whole" --fp16
last="$RUN/whole"; k=1
for cycle in $LATER; do
  IFS=: read -r steps lr <<< "$cycle"; k=$((k + 1))
  stage "planner$k" planner "$k" "$last" "$steps" "$lr"
  stage "export$k" latentdit export --run "$RUN/train$k" --out "$RUN/whole$k" --fp16
  last="$RUN/whole$k"
done
if [ "$COUNT" -gt 0 ]; then
  stage preprocess-count latentdit preprocess --source shapes --n "$N" --seed "$COUNT_SEED" --scene-weights 1 1 2 \
    --count-layout distinct --out "$RUN/count-shards" --autoencoder "$AE" --max-length 24 --shard-size 2048 \
    --batch-size 128 --no-progress
  stage counting latentdit train --preset shapes-small --init_from "$last" --model.layout_planner true \
    --model.layout_gain "$GAIN" --sampling.count_contrast "$CONTRAST" --sampling.sampler "$SAMPLER" --train_only "$TUNED" --layout_weight 0 \
    --data "$RUN/count-shards" \
    --out "$RUN/train-count" --steps "$COUNT" --optim.lr 1e-3 --optim.warmup_steps 50 --resume latest --no-progress
  stage export-count latentdit export --run "$RUN/train-count" --out "$RUN/whole-count" --fp16
  last="$RUN/whole-count"
fi
[ -d "$DEST" ] || stage delta latentdit delta "$last" --base "$BASE" --out "$DEST"
stage eval latentdit eval alignment --model "$DEST" --split heldout --n "$EVAL_N" --samples 4 --out "$RUN/eval"
