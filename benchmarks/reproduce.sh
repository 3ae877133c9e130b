#!/usr/bin/env bash
# Runs every reproduction protocol of benchmarks/REPRODUCTION.md, one after the other
# (the runs use all cores; do not start two at once on a small machine).
#   CL_OPTAX_DATA=/path/to/folder/with/mnist.npz bash benchmarks/reproduce.sh [OUT]
set -euo pipefail
OUT=${1:-results/repro}
PY=${PYTHON:-python}
run() {  # name, then the arguments of benchmarks.continual
  local name=$1; shift
  mkdir -p "$OUT/$name"
  echo "=== $name: $* ($(date -u +%H:%M:%S))"
  /usr/bin/time -f "$name wall %e s" $PY -m benchmarks.continual --out "$OUT/$name" --no-progress "$@" \
    2>&1 | tee "$OUT/$name/log.txt"
}
# (a) A-GEM protocol, permuted MNIST: 17 evaluation tasks, VAN lr 0.03 (replicate_results_iclr19.sh)
run agem-pmnist-sgd --stream pmnist-agem --methods sgd --seeds 5
run agem-pmnist-masks --stream pmnist-agem --methods soft_mask,freeze --seeds 3
# (b) GEM protocol: "single" baseline lrs of run_experiments.sh (0.03 permutations, 0.003 rotations)
run gem-pmnist-sgd --stream pmnist-gem --methods sgd --seeds 5 --lr 0.03
run gem-rmnist-sgd --stream rmnist-gem --methods sgd --seeds 5 --lr 0.003
# (c) van de Ven et al.: split MNIST in the three scenarios, Adam 1e-3, 2000 iterations/task
for sc in task domain class; do
  run vdv-splitmnist-$sc --stream split-mnist --scenario $sc --methods adam,soft_mask --seeds 3
done
# (d) GPM protocol: permuted MNIST, 10 tasks, 5 epochs, lr 0.01, no biases
run gpm-pmnist-sgd --stream pmnist-gpm --methods sgd --seeds 3
