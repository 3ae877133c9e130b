#!/usr/bin/env bash
# The 100 M-parameter floor table and the full-data A-GEM protocol's timing on a GPU or TPU,
# in under 8 minutes on one card (each part has its own time limit). Prints the card first.
#   CL_OPTAX_DATA=/path/to/folder/with/mnist.npz bash benchmarks/accelerator_check.sh [OUT]
# Without MNIST the A-GEM part is skipped (the table still runs). PYTHON picks the interpreter.
set -uo pipefail
OUT=${1:-results/accelerator}
PY=${PYTHON:-python}
mkdir -p "$OUT"
echo "=== card"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
$PY -c "import jax; d = jax.devices()[0]; print(jax.__version__, d.platform, d.device_kind, len(jax.devices()), 'devices')"
# 1. every element-wise transform at ~100 M parameters, float32 then bfloat16: update time,
#    floor (bytes / a*x+y bandwidth measured in the same run) and compiled bytes per parameter.
#    (about 11 cases x 3 timers x 5 repeats; well under a minute each on a card)
for dtype in float32 bfloat16; do
  echo "=== floor table, lm-100m $dtype ($(date -u +%T))"
  timeout 150 $PY -m benchmarks.floor --model lm-100m --dtype "$dtype" --repeats 5 --calls 5 \
    --json "$OUT/floor-lm-100m-$dtype.json" || echo "(floor $dtype: stopped, rc $?)"
done
echo "=== GEM at 10 M parameters, k = 20: the QP's share of the update ($(date -u +%T))"
timeout 60 $PY -c "from benchmarks import gem_parts; print(gem_parts.gem_parts('lm-10m', 20))" \
  || echo "(gem: stopped, rc $?)"
# 2. the full-data A-GEM protocol (permuted MNIST, 17 tasks, 5500 steps of batch 10 each,
#    256 reference examples per step): one seed, training time from the runner's log.
if [ -n "${CL_OPTAX_DATA:-}" ]; then
  echo "=== A-GEM, pmnist-agem, 1 seed ($(date -u +%T))"
  timeout 240 /usr/bin/time -f "agem wall %e s" $PY -m benchmarks.continual --stream pmnist-agem \
    --methods agem --seeds 1 --no-progress --out "$OUT/agem" 2>&1 | tail -n 25 \
    || echo "(agem: stopped, rc $?)"
else
  echo "=== A-GEM skipped: set CL_OPTAX_DATA to the folder holding mnist.npz"
fi
echo "=== done ($(date -u +%T))"
