#!/bin/bash
# sd_resnet20.cifar10, issue 23 (200 epochs, bf16). Start: bash results/cifar10_resnet20_sd_200ep/restart.sh
# Continue after an interruption (a session's end stops it): bash results/cifar10_resnet20_sd_200ep/restart.sh resume
# VARIANT=constant trains the constant-depth twin (same recipe, --drop-path 0) into its own folder.
# The two run side by side with one thread each (THREADS=1): on these 2 cores one bf16 thread trains
# sd_resnet20 at 815 img/s against 1556 for two (results/cpu_bf16_training), so two runs at once finish
# both a little sooner than one after the other. As run here:
#   THREADS=1 bash results/cifar10_resnet20_sd_200ep/restart.sh; THREADS=1 VARIANT=constant bash ...restart.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export SD_ZOO_CACHE=${SD_ZOO_CACHE:-/work/cache}
DATA=${DATA:-/work/data/cifar10}
NAME=sd_resnet20_c10_200ep${VARIANT:+_$VARIANT}
R=/work/runs/$NAME
extra=()
[[ ${VARIANT:-} == constant ]] && extra+=(--drop-path 0)
if [[ ${1:-} == resume ]]; then extra+=(--resume "$R/last.pth.tar"); else extra+=(--output /work/runs --experiment "$NAME"); fi
export OMP_NUM_THREADS=${THREADS:-2}
nohup .venv/bin/sd-zoo train --config results/cifar10_resnet20_sd_200ep/recipe.yaml --data-dir "$DATA" \
  --no-progress --log-interval 100 "${extra[@]}" >> "/work/runs/$NAME.log" 2>&1 &
echo "started $! ($NAME, log /work/runs/$NAME.log)"
