# Sourced by the recipes: `stage NAME CMD ...` runs one stage and prints its wall-clock time.
stage() {
  local name=$1 start=$SECONDS
  shift
  "$@"
  echo "[recipe] $name: $((SECONDS - start)) s (total $SECONDS s)"
}
