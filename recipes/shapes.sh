#!/usr/bin/env bash
# Reproduce the packaged `shapes` model on a 2-core CPU: autoencoder -> shards -> denoiser ->
# later cosine cycles, each fine-tuning the previous cycle's export on fresh scenes -> export
# (fp16, to $RUN/model) -> alignment on the held-out split.
# CYCLES lists the later cycles as STEPS:SCENES:SEED[:OBJECT_WEIGHT]; CYCLES="" stops after the first.
#   bash recipes/shapes.sh            # RUN=runs/shapes N=30000 by default
#   DEST=latentdit/weights/shapes bash recipes/shapes.sh   # replace the packaged model on purpose
# Each stage prints its wall-clock time ([recipe] lines).
# Every stage resumes where it stopped if the script is run again.
set -euo pipefail
RUN=${RUN:-runs/shapes}
N=${N:-30000}
AE_STEPS=${AE_STEPS:-3600}
STEPS=${STEPS:-2700}
CYCLES=${CYCLES-2600:40000:0 1500:40000:1:1.5 1800:40000:2 1200:40000:3}  # the packaged chain
EVAL_N=${EVAL_N:-64}
DEST=${DEST:-$RUN/model}  # never the packaged weights unless asked for
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

. "$(dirname "$0")/stage.sh"  # stage NAME CMD ...: run one stage and print its time

stage autoencoder latentdit train-ae --preset shapes-fast --out "$RUN/ae" --steps "$AE_STEPS" --no-progress
stage preprocess latentdit preprocess --source shapes --n "$N" --out "$RUN/shards" --autoencoder "$RUN/ae/autoencoder" \
  --max-length 24 --shard-size 2048 --batch-size 128 --no-progress
stage denoiser latentdit train --preset shapes-small --data "$RUN/shards" --out "$RUN/train" --steps "$STEPS" \
  --resume latest --no-progress
# Each later cycle K fine-tunes the previous export with a fresh warm-up and cosine decay.
k=1
train=$RUN/train
export_name() { if [ "$1" -eq 1 ]; then echo export; else echo "export$1"; fi; }
for spec in $CYCLES; do
  IFS=: read -r steps scenes seed weight <<< "$spec"
  stage "$(export_name $k)" latentdit export --run "$train" --out "$RUN/cycle$k" --fp16
  k=$((k + 1))
  stage "preprocess$k" latentdit preprocess --source shapes --n "$scenes" --seed "$seed" --out "$RUN/shards$k" \
    --autoencoder "$RUN/ae/autoencoder" --max-length 24 --shard-size 2048 --batch-size 128 --no-progress
  stage "cycle$k" latentdit train --preset shapes-small --data "$RUN/shards$k" --out "$RUN/train$k" \
    --init_from "$RUN/cycle$((k - 1))" --steps "$steps" --optim.lr 4e-4 --optim.warmup_steps 50 \
    --object_weight "${weight:-0}" --resume latest --no-progress
  train=$RUN/train$k
done
stage "$(export_name $k)" latentdit export --run "$train" --out "$DEST" --fp16
stage eval latentdit eval alignment --model "$DEST" --split heldout --n "$EVAL_N" --samples 4 --out "$RUN/eval"
