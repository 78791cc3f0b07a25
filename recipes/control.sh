#!/usr/bin/env bash
# Fine-tune the packaged `shapes` model into its silhouette-controlled variant on a CPU:
# shards with control maps -> fine-tune (new input channels start at zero) -> fp16 export ->
# control adherence and colour accuracy on held-out scenes (benchmarks/bench_control.py).
#   taskset -c 1 bash recipes/control.sh        # RUN=runs/control N=16384 STEPS=1200 by default
# Each stage prints its wall-clock time ([recipe] lines); every stage resumes if run again.
set -euo pipefail
RUN=${RUN:-runs/control}
N=${N:-16384}
STEPS=${STEPS:-1200}
BATCH=${BATCH:-32}
KIND=${KIND:-silhouette}
EVAL_N=${EVAL_N:-64}
DEST=${DEST:-$RUN/model}  # never the packaged weights unless asked for
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

. "$(dirname "$0")/stage.sh"  # stage NAME CMD ...: run one stage and print its time

stage preprocess latentdit preprocess --source shapes --n "$N" --out "$RUN/shards" \
  --autoencoder latentdit/weights/shapes/vae --max-length 24 --shard-size 2048 --batch-size 128 \
  --control "$KIND" --no-progress
stage finetune latentdit train --preset shapes-small --init_from shapes --data "$RUN/shards" --out "$RUN/train" \
  --model.control "$KIND" --model.extra_in_channels 16 --steps "$STEPS" --batch_size "$BATCH" \
  --optim.lr 2e-4 --optim.warmup_steps 50 --checkpoint_every 100 --preview_every 0 --resume latest --no-progress
stage export latentdit export --run "$RUN/train" --out "$DEST" --fp16
stage eval python benchmarks/bench_control.py --model "$DEST" --base shapes --n "$EVAL_N"
