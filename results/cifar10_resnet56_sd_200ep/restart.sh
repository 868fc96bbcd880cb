#!/bin/bash
# sd_resnet56.cifar10, issue 23 (200 epochs, bf16, compiled blocks). Start: bash results/cifar10_resnet56_sd_200ep/restart.sh
# Continue after an interruption (a session's end stops it): bash results/cifar10_resnet56_sd_200ep/restart.sh resume
# THREADS (default 2) sets the torch threads: 1 while another job (a comparison run) trains on the other core.
# VARIANT=constant trains the constant-depth twin (same recipe, --drop-path 0) into its own folder, if time allows.
set -euo pipefail
cd "$(dirname "$0")/../.."
export SD_ZOO_CACHE=${SD_ZOO_CACHE:-/work/cache}
DATA=${DATA:-/work/data/cifar10}
NAME=sd_resnet56_c10_200ep${VARIANT:+_$VARIANT}
R=/work/runs/$NAME
extra=()
[[ ${VARIANT:-} == constant ]] && extra+=(--drop-path 0)
if [[ ${1:-} == resume ]]; then extra+=(--resume "$R/last.pth.tar"); else extra+=(--output /work/runs --experiment "$NAME"); fi
export OMP_NUM_THREADS=${THREADS:-2}
nohup .venv/bin/sd-zoo train --config results/cifar10_resnet56_sd_200ep/recipe.yaml --data-dir "$DATA" \
  --no-progress --log-interval 100 "${extra[@]}" >> "/work/runs/$NAME.log" 2>&1 &
echo "started $! ($NAME, log /work/runs/$NAME.log)"
