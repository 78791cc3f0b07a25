#!/usr/bin/env bash
# Reproduce the packaged `shapes` model on a 2-core CPU: autoencoder -> shards -> denoiser ->
# later cosine cycles, each fine-tuning the previous cycle's export on fresh scenes -> export
# (fp16, to $RUN/model) -> the autoencoder's decoder fine-tuned on the same latents (in cycles, each
# from the last) and swapped into the model -> alignment on the held-out split.
# CYCLES lists the later cycles as STEPS:SCENES:SEED[:OBJECT_WEIGHT]; CYCLES="" stops after the first.
# DECODER_CYCLES lists the decoder's cycles as STEPS:LR:SEED.
# SEED as A+B runs one fine-tune per seed side by side and averages them (latentdit average).
#   bash recipes/shapes.sh            # RUN=runs/shapes N=30000 by default
#   DEST=latentdit/weights/shapes bash recipes/shapes.sh   # replace the packaged model on purpose
# Each stage prints its wall-clock time ([recipe] lines).
# Every stage resumes where it stopped if the script is run again.
set -euo pipefail
RUN=${RUN:-runs/shapes}
N=${N:-30000}
AE_STEPS=${AE_STEPS:-3600}
STEPS=${STEPS:-2700}
CYCLES=${CYCLES-2600:40000:0 1500:40000:1:1.5 1800:40000:2 1200:40000:3 1200:40000:4+5 1200:40000:6+7}  # the packaged chain
DECODER_CYCLES=${DECODER_CYCLES:-6000:5e-4:7 6000:2.5e-4:8}
EVAL_N=${EVAL_N:-64}
DEST=${DEST:-$RUN/model}  # never the packaged weights unless asked for
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

. "$(dirname "$0")/stage.sh"  # stage NAME CMD ...: run one stage and print its time

stage autoencoder latentdit train-ae --preset shapes-fast --out "$RUN/ae" --steps "$AE_STEPS" --no-progress
stage preprocess latentdit preprocess --source shapes --n "$N" --out "$RUN/shards" --autoencoder "$RUN/ae/autoencoder" \
  --max-length 24 --shard-size 2048 --batch-size 128 --no-progress
stage denoiser latentdit train --preset shapes-small --data "$RUN/shards" --out "$RUN/train" --steps "$STEPS" \
  --resume latest --no-progress
# Each later cycle K fine-tunes the previous cycle's model with a fresh warm-up and cosine decay.
# SEED may be SEED+SEED+...: one fine-tune per seed, side by side on one thread each, averaged.
ncycles=$(wc -w <<< "$CYCLES")
model_of() { if [ "$1" -eq $((ncycles + 1)) ]; then echo "$DEST"; else echo "$RUN/cycle$1"; fi; }
fine_tune() {  # TAG INIT STEPS OBJECT_WEIGHT
  latentdit train --preset shapes-small --data "$RUN/shards$1" --out "$RUN/train$1" --init_from "$2" \
    --steps "$3" --optim.lr 4e-4 --optim.warmup_steps 50 --object_weight "${4:-0}" --resume latest --no-progress
}
fine_tune_all() {  # INIT STEPS OBJECT_WEIGHT TAG...
  local init=$1 steps=$2 weight=$3 pids=() i
  shift 3
  if [ $# -eq 1 ]; then fine_tune "$1" "$init" "$steps" "$weight"; return; fi
  local tags=("$@")
  for i in "${!tags[@]}"; do
    LATENTDIT_THREADS=1 fine_tune "${tags[i]}" "$init" "$steps" "$weight" > "$RUN/train${tags[i]}.log" 2>&1 &
    pids[i]=$!
  done
  for i in "${!tags[@]}"; do
    wait "${pids[i]}" || { tail -n 5 "$RUN/train${tags[i]}.log" >&2; return 1; }
  done
}
export_cycle() {  # OUT TAG...
  local out=$1 parts=() tag
  shift
  if [ $# -eq 1 ]; then latentdit export --run "$RUN/train$1" --out "$out" --fp16; return; fi
  for tag in "$@"; do
    latentdit export --run "$RUN/train$tag" --out "$RUN/cycle$tag" --fp16
    parts+=("$RUN/cycle$tag")
  done
  latentdit average "${parts[@]}" --out "$out"
}
stage export latentdit export --run "$RUN/train" --out "$(model_of 1)" --fp16
k=1
for spec in $CYCLES; do
  IFS=: read -r steps scenes seeds weight <<< "$spec"
  init=$(model_of $k)
  k=$((k + 1))
  IFS=+ read -r -a seed_list <<< "$seeds"
  tags=()
  for seed in "${seed_list[@]}"; do
    if [ ${#seed_list[@]} -eq 1 ]; then tags+=("$k"); else tags+=("$k-$seed"); fi
    stage "preprocess${tags[-1]}" latentdit preprocess --source shapes --n "$scenes" --seed "$seed" \
      --out "$RUN/shards${tags[-1]}" --autoencoder "$RUN/ae/autoencoder" --max-length 24 --shard-size 2048 \
      --batch-size 128 --no-progress
  done
  stage "cycle$k" fine_tune_all "$init" "$steps" "${weight:-0}" "${tags[@]}"
  stage "export$k" export_cycle "$(model_of $k)" "${tags[@]}"
done
# A sharper decoder on the same latents: the encoder (so every shard above) stays as it is.
decoder="$RUN/ae/autoencoder"; d=0
for cycle in $DECODER_CYCLES; do
  IFS=: read -r steps lr seed <<< "$cycle"; d=$((d + 1))
  stage "decoder$d" latentdit train-ae --preset shapes-fast --init_from "$decoder" --decoder_only true \
    --object_weight 8 --steps "$steps" --batch_size 16 --lr "$lr" --seed "$seed" --out "$RUN/decoder$d" --no-progress
  decoder="$RUN/decoder$d/autoencoder"
done
swap_decoder() { rm -rf "$DEST/vae.new" && cp -r "$decoder" "$DEST/vae.new" && rm -rf "$DEST/vae" \
  && mv "$DEST/vae.new" "$DEST/vae"; }
stage swap-decoder swap_decoder
stage eval latentdit eval alignment --model "$DEST" --split heldout --n "$EVAL_N" --samples 4 --out "$RUN/eval"
