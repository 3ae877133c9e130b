#!/usr/bin/env bash
# Runs every reproduction protocol of benchmarks/REPRODUCTION.md, one after the other
# (each run uses all cores; do not start two at once on a small machine).
#   CL_OPTAX_DATA=/path/to/folder/with/mnist.npz bash benchmarks/reproduce.sh [OUT] [NAME...]
# With NAMEs only those runs; e.g. `bash benchmarks/reproduce.sh results/repro agem-pmnist-sgd`.
set -euo pipefail
OUT=${1:-results/repro}
shift || true
ONLY=" $* "
PY=${PYTHON:-python}
run() {  # name, then the arguments of benchmarks.continual
  local name=$1; shift
  if [ "$ONLY" != "  " ] && [[ "$ONLY" != *" $name "* ]]; then return; fi
  mkdir -p "$OUT/$name"
  echo "=== $name: $* ($(date -u +%H:%M:%S))"
  # a run that stops (e.g. a method whose loss diverges) does not stop the script
  /usr/bin/time -f "$name wall %e s" $PY -m benchmarks.continual --out "$OUT/$name" --no-progress "$@" \
    2>&1 | tee "$OUT/$name/log.txt" || echo "=== $name stopped (exit $?): see $OUT/$name/log.txt"
}
# (a) A-GEM, permuted MNIST: 17 evaluation tasks, every example once, VAN lr 0.03
#     (replicate_results_iclr19.sh); and the code's later 1000-examples default
run agem-pmnist-sgd --stream pmnist-agem --methods sgd --seeds 5
run agem1k-pmnist-sgd --stream pmnist-agem-1k --methods sgd --seeds 5
run agem1k-pmnist-masks --stream pmnist-agem-1k --methods soft_mask,freeze --seeds 3
# (b) GEM: the "single" baseline lrs of run_experiments.sh (0.03 permutations, 0.003 rotations)
run gem-pmnist-sgd --stream pmnist-gem --methods sgd --seeds 5 --lr 0.03
run gem-rmnist-sgd --stream rmnist-gem --methods sgd --seeds 5 --lr 0.003
#     and at the lr 0.1 GEM used for every other model
run gem-pmnist-sgd-lr0.1 --stream pmnist-gem --methods sgd --seeds 5
run gem-rmnist-sgd-lr0.1 --stream rmnist-gem --methods sgd --seeds 5
# (c) van de Ven et al.: split MNIST in the three scenarios, Adam 1e-3, 2000 iterations/task
for sc in task domain class; do
  run vdv-splitmnist-$sc --stream split-mnist --scenario $sc --methods adam,soft_mask --seeds 3
done
# (d) GPM: permuted MNIST, 10 tasks, 5 epochs, lr 0.01, no biases
run gpm-pmnist-sgd --stream pmnist-gpm --methods sgd --seeds 2
# masks on the full A-GEM protocol (slow: SPG reads all 55000 examples after each task)
run agem-pmnist-masks --stream pmnist-agem --methods soft_mask,freeze --seeds 1
# ---- the other methods (each method's lr / strength per protocol: protocols.SETTINGS in
#      benchmarks/continual/); seeds as in REPRODUCTION.md (time-limited: 1-2)
# (a') A-GEM protocol, 1000 examples per task
run agem1k-pmnist-agem --stream pmnist-agem-1k --methods agem --seeds 2
run agem1k-pmnist-gem --stream pmnist-agem-1k --methods gem --seeds 2
run agem1k-pmnist-ewc --stream pmnist-agem-1k --methods ewc --seeds 2
run agem1k-pmnist-mas --stream pmnist-agem-1k --methods mas --seeds 2
run agem1k-pmnist-si --stream pmnist-agem-1k --methods si --seeds 2
run agem1k-pmnist-oewc-ncl --stream pmnist-agem-1k --methods online_ewc --seeds 2
run agem1k-pmnist-ncl --stream pmnist-agem-1k --methods ncl --seeds 2
run agem1k-pmnist-sgd-lr0.1 --stream pmnist-agem-1k --methods sgd --lr 0.1 --seeds 1
# (c) split MNIST (van de Ven's strengths per scenario); Fisher on 1000 examples per task
run vdv-splitmnist-task-ewc-fullfisher --stream split-mnist --scenario task --methods ewc --seeds 1
run vdv-splitmnist-task-reg --stream split-mnist --scenario task --methods ewc,online_ewc,si,ncl --seeds 1 --hp fisher_n=1000
run vdv-splitmnist-task-reg-seed1 --stream split-mnist --scenario task --methods ewc,online_ewc,si,ncl --seeds 1 --seed0 1 --hp fisher_n=1000
run vdv-splitmnist-domain-reg --stream split-mnist --scenario domain --methods ewc,si --seeds 1 --hp fisher_n=1000
run vdv-splitmnist-domain-reg2 --stream split-mnist --scenario domain --methods online_ewc,ncl --seeds 1 --hp fisher_n=1000
# (b) GEM permutations / rotations
run gem-pmnist-gem --stream pmnist-gem --methods gem,agem --seeds 1
run gem-pmnist-gem-seed1 --stream pmnist-gem --methods gem,agem --seeds 1 --seed0 1
run gem-rmnist-gem --stream rmnist-gem --methods gem,agem --seeds 1
# (d) GPM permuted MNIST (two seeds: 0, then 1)
run gpm-pmnist-gpm --stream pmnist-gpm --methods gpm --seeds 1
run gpm-pmnist-gpm-seed1 --stream pmnist-gpm --methods gpm --seeds 1 --seed0 1
# ---- projection methods on the other protocols, full-data (a), class-IL, K-FAC NCL
run agem1k-pmnist-gpm --stream pmnist-agem-1k --methods gpm --seeds 2
run agem1k-pmnist-ogd --stream pmnist-agem-1k --methods ogd --seeds 1  # 3.4 GB basis, ~13 min
run agem1k-pmnist-ncl-kfac --stream pmnist-agem-1k --methods ncl_kfac --seeds 2
run gem-pmnist-ogd --stream pmnist-gem --methods ogd --seeds 1
run gem-pmnist-gpm --stream pmnist-gem --methods gpm --seeds 2
run agem-pmnist-reg --stream pmnist-agem --methods ewc,mas,si --seeds 1  # MAS, SI diverge
run agem-pmnist-si --stream pmnist-agem --methods si --seeds 1
run agem-pmnist-agem --stream pmnist-agem --methods agem --seeds 1  # ~7 min of training
run agem-pmnist-more --stream pmnist-agem --methods gpm,online_ewc,ncl --seeds 1
run agem-pmnist-gem --stream pmnist-agem --methods gem --seeds 1  # ~40 min of training
run vdv-splitmnist-class-reg --stream split-mnist --scenario class --methods ewc,online_ewc,si,ncl --seeds 1 --hp fisher_n=1000
run vdv-splitmnist-task-ncl-kfac --stream split-mnist --scenario task --methods ncl_kfac --seeds 1 --hp fisher_n=1000
# (e) DER paper, seq-MNIST (and Fashion-MNIST): replay and distillation, buffers 500 / 200
FASHION=${CL_OPTAX_FASHION:-${CL_OPTAX_DATA:-.}/fashion_mnist.npz}
for sc in class task; do
  for data in mnist fashion; do
    d=(); [ $data = fashion ] && d=(--data "$FASHION")
    run der-seq$data-$sc-500 --stream seq-mnist --scenario $sc --hp buffer=500 "${d[@]}" --seeds 1 \
      --methods sgd,online_ewc,si,lwf,er,der,derpp,agem,gem
    run der-seq$data-$sc-200 --stream seq-mnist --scenario $sc --hp buffer=200 "${d[@]}" --seeds 1 \
      --methods er,der,derpp,agem,gem
  done
done
# DER paper, P-MNIST and R-MNIST (domain-IL, 20 tasks, batch 128, 1 epoch), buffers 200 / 500
for st in pmnist rmnist; do
  for b in 200 500; do
    run der-$st-$b --stream der-$st --hp buffer=$b --methods sgd,er,der,derpp,agem,gem --seeds 3
  done
done
# R-MNIST A-GEM and GEM at buffer 200: seeds 3-4 (their 3-seed means sat 4-5 points below the recollection)
run der-rmnist-200-seeds34 --stream der-rmnist --hp buffer=200 --methods agem,gem --seeds 2 --seed0 3
# class-incremental replay (issue 24): seq-MNIST and seq-Fashion-MNIST, 3 seeds, buffers 500 / 200
for data in mnist fashion; do
  d=(); [ $data = fashion ] && d=(--data "$FASHION")
  for b in 500 200; do
    run classil-seq$data-$b --stream seq-mnist --hp buffer=$b "${d[@]}" --seeds 3 \
      --methods er,er_ace,der,derpp,xder,gem,agem,icarl,gdumb,bic,wa
  done
done
for b in 500 200; do  # WA with PyCIL's CE + 2 KD
  run classil-seqmnist-wa-kd2-$b --stream seq-mnist --methods wa --hp buffer=$b --hp kd=2 --seeds 3
done
# GDumb against its official README: the runner's MLP (bn=0), then the official BatchNorm net (bn=1)
for bn in 0 1; do
  run gdumb-mlp100-m300-bn$bn --stream gdumb-mnist --methods gdumb --seeds 3 --hp buffer=300 --hp bn=$bn
  run gdumb-mlp100-m500-bn$bn --stream gdumb-mnist --methods gdumb --seeds 3 --hp buffer=500 --hp bn=$bn
  run gdumb-mlp400-m500-bn$bn --stream gdumb-mnist-400 --methods gdumb --seeds 3 --hp buffer=500 --hp bn=$bn
  run gdumb-mlp400-m4400-bn$bn --stream gdumb-mnist-400 --methods gdumb --seeds 3 --hp buffer=4400 --hp bn=$bn
done
# the replay methods' class-IL fix on van de Ven's split MNIST; LwF there
run vdv-splitmnist-class-replay --stream split-mnist --scenario class --epochs 1 --methods agem,gem --seeds 1
run vdv-splitmnist-class-lwf --stream split-mnist --scenario class --methods lwf --seeds 1
# ---- the variants of the first table of REPRODUCTION.md: the official codes' settings
# (a) the A-GEM code's initialisation, and its own EWC and MAS (methods/agem_code.py)
run agem-pmnist-sgd-agem-init --stream pmnist-agem --methods sgd --seeds 3 --init agem
run agem-pmnist-ewc-agem-code --stream pmnist-agem --methods ewc_agem_code --seeds 2 --init agem
run agem-pmnist-mas-agem-code --stream pmnist-agem --methods mas_agem_code --seeds 2 --init agem
run agem-pmnist-mas-agem-code-torch-init --stream pmnist-agem --methods mas_agem_code --seeds 1
# (c) split MNIST "None" rows, and van de Ven's 2019 code: digits assigned to tasks at
#     random per seed, that code's per-scenario strengths (preset split-mnist-2019)
run vdv-splitmnist-task-adam --stream split-mnist --scenario task --methods adam --seeds 3
run vdv-splitmnist-domain-adam --stream split-mnist --scenario domain --methods adam --seeds 3
run vdv19-splitmnist-task --stream split-mnist-2019 --scenario task --methods adam --seeds 2
run vdv19-splitmnist-domain --stream split-mnist-2019 --scenario domain --methods adam,si,online_ewc --seeds 2
run vdv19-splitmnist-task-seed2 --stream split-mnist-2019 --scenario task --methods adam --seeds 2 --seed0 2
run vdv19-splitmnist-domain-adam-seed2 --stream split-mnist-2019 --scenario domain --methods adam --seeds 2 --seed0 2
# (b) the GEM code's own init (model/common.py: Glorot-uniform kernels, zero biases)
run gem-rmnist-sgd-gem-init --stream rmnist-gem --methods sgd --seeds 5 --lr 0.003 --init gem
run gem-pmnist-sgd-gem-init --stream pmnist-gem --methods sgd --seeds 5 --lr 0.03 --init gem
run gem-rmnist-gem-gem-init --stream rmnist-gem --methods gem --seeds 3 --init gem
# (a) GEM with the A-GEM code's init (~50 min of training per seed on 2 cores)
run agem-pmnist-gem-agem-init --stream pmnist-agem --methods gem --seeds 1 --init agem
# ---- more seeds for the first table of REPRODUCTION.md (the runs its rows name)
run agem-pmnist-agem-quiet --stream pmnist-agem --methods agem --seeds 1  # seed 0, the speed row
run agem-pmnist-agem-seed1 --stream pmnist-agem --methods agem --seeds 2 --seed0 1
run agem-pmnist-ewc-seed1 --stream pmnist-agem --methods ewc --seeds 2 --seed0 1
run gpm-pmnist-gpm-seeds2-4 --stream pmnist-gpm --methods gpm --seeds 3 --seed0 2
run vdv-splitmnist-task-reg-seed2 --stream split-mnist --scenario task --methods ewc,online_ewc,si --seeds 1 --seed0 2 --hp fisher_n=1000
run vdv19-splitmnist-task-seed4 --stream split-mnist-2019 --scenario task --methods adam --seeds 1 --seed0 4
run vdv19-splitmnist-domain-seed2 --stream split-mnist-2019 --scenario domain --methods si,online_ewc --seeds 3 --seed0 2
# ---- the later seeds of the first table's rows (the runs its rows name)
run agem-pmnist-agem-seed3 --stream pmnist-agem --methods agem --seeds 2 --seed0 3
run agem-pmnist-ewc-agem-code-seed2 --stream pmnist-agem --methods ewc_agem_code --seeds 1 --seed0 2 --init agem
run agem-pmnist-mas-agem-code-seed2 --stream pmnist-agem --methods mas_agem_code --seeds 1 --seed0 2 --init agem
run agem-pmnist-mas-agem-code-torch-init-seed1 --stream pmnist-agem --methods mas_agem_code --seeds 2 --seed0 1
run agem-pmnist-sgd-agem-init-seed3 --stream pmnist-agem --methods sgd --seeds 2 --seed0 3 --init agem
run agem-pmnist-ewc-seed0 --stream pmnist-agem --methods ewc --seeds 1
run agem-pmnist-ewc-seed3 --stream pmnist-agem --methods ewc --seeds 2 --seed0 3
run agem-pmnist-mas-seeds --stream pmnist-agem --methods mas --seeds 3
run vdv-splitmnist-domain-reg-seeds --stream split-mnist --scenario domain --methods ewc,si,online_ewc --seeds 3 --hp fisher_n=1000
run gem-rmnist-gem-seeds --stream rmnist-gem --methods gem --seeds 3
run vdv-splitmnist-class-reg-seeds --stream split-mnist --scenario class --methods ewc,online_ewc,si --seeds 3 --hp fisher_n=1000
run vdv-splitmnist-task-reg-seeds0-1 --stream split-mnist --scenario task --methods ewc,online_ewc,si --seeds 2 --hp fisher_n=1000
run vdv-splitmnist-task-reg-seed3 --stream split-mnist --scenario task --methods ewc,online_ewc,si --seeds 2 --seed0 3 --hp fisher_n=1000
run vdv-splitmnist-domain-reg-seed3 --stream split-mnist --scenario domain --methods ewc,si,online_ewc --seeds 2 --seed0 3 --hp fisher_n=1000
run vdv-splitmnist-class-reg-seed3 --stream split-mnist --scenario class --methods ewc,online_ewc,si --seeds 2 --seed0 3 --hp fisher_n=1000
run vdv19-splitmnist-domain-adam-seed4 --stream split-mnist-2019 --scenario domain --methods adam --seeds 1 --seed0 4
run vdv-splitmnist-class-adam --stream split-mnist --scenario class --methods adam --seeds 5
# GEM on (a), seeds 1-2 of both inits and 3-4 of PyTorch's (~50 min of training per seed on 2 cores)
run agem-pmnist-gem-agem-init-seed1 --stream pmnist-agem --methods gem --seeds 2 --seed0 1 --init agem
run agem-pmnist-gem-seed1 --stream pmnist-agem --methods gem --seeds 2 --seed0 1
run agem-pmnist-gem-seed3 --stream pmnist-agem --methods gem --seeds 2 --seed0 3
# ---- not run yet: GEM on (a) with the A-GEM code's init, seeds 3-4 (5 seeds on that row)
run agem-pmnist-gem-agem-init-seed3 --stream pmnist-agem --methods gem --seeds 2 --seed0 3 --init agem
# the penalties' stability on a textbook permuted MNIST (README): defaults, then the note's strengths
run pmnist-5x10k-penalties --stream pmnist-5x10k --methods sgd,ewc,online_ewc,mas,si --seeds 1
run pmnist-5x10k-mas-note --stream pmnist-5x10k --methods mas --hp strength=0.553 --seeds 1
run pmnist-5x10k-si-note --stream pmnist-5x10k --methods si --hp strength=0.13 --seeds 1
# parameter isolation (issue 23), task-IL: split MNIST, then the two permuted-MNIST presets capped for a CPU
run iso-splitmnist-task --stream split-mnist --scenario task --methods adam,hat,packnet,wsn --seeds 3
run iso-wsn-pmnist-capped --stream wsn-pmnist --methods adam,hat,packnet,wsn --seeds 3 --n-train 5400 --n-test 2000
run iso-hat-pmnist-20k --stream hat-pmnist --methods hat,packnet,wsn,freeze,soft_mask,gpm,ewc,sgd --seeds 3 --n-train 20000 --n-test 2000 --epochs 1 --hp retrain_epochs=1
run iso-wsn-pmnist-others --stream wsn-pmnist --methods freeze,soft_mask,gpm,ewc --seeds 3 --n-train 5400 --n-test 2000
run iso-splitdigits-task --stream split-digits --scenario task --methods adam,hat,packnet,wsn --seeds 3
# the projection family on GPM's protocol (issue 25): the official rank rule, SGP, Adam-NSCL, TRGP,
# EWC, SGD and RWalk; RWalk's two forms on the A-GEM protocol
run gpm-pmnist-gpm-official --stream pmnist-gpm --methods gpm_official,sgp --seeds 3
run gpm-pmnist-nscl-trgp --stream pmnist-gpm --methods nscl,trgp --seeds 3
run gpm-pmnist-ewc-sgd --stream pmnist-gpm --methods ewc,sgd --seeds 3
run gpm-pmnist-rwalk --stream pmnist-gpm --methods rwalk --seeds 1
run gpm-pmnist-rwalk-seed12 --stream pmnist-gpm --methods rwalk --seeds 2 --seed0 1
# OGD on GPM's protocol: ≈ 2 h per seed on the 2-core VM (one seed per run, so each fits a session)
run gpm-pmnist-ogd-seed0 --stream pmnist-gpm --methods ogd --seeds 1
run gpm-pmnist-ogd-seed1 --stream pmnist-gpm --methods ogd --seeds 1 --seed0 1
run gpm-pmnist-ogd-seed2 --stream pmnist-gpm --methods ogd --seeds 1 --seed0 2
run agem-pmnist-rwalk --stream pmnist-agem --methods rwalk --seeds 3 --init agem
run agem-pmnist-rwalk-official --stream pmnist-agem --methods rwalk_official --seeds 3 --init agem
