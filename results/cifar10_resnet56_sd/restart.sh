#!/bin/bash
# sd_resnet56.cifar10 (issue 14). Start: bash results/cifar10_resnet56_sd/restart.sh ; continue: ... resume
cd /work/main
export SD_ZOO_CACHE=/work/cache
R=/work/runs/sd_resnet56_c10_sd
if [[ ${1:-} == resume ]]; then extra=(--resume $R/last.pth.tar); else extra=(--output /work/runs --experiment sd_resnet56_c10_sd); fi
nohup .venv/bin/sd-zoo train --config cifar10_resnet56_sd --dataset '' --data-dir /work/data/cifar10 --no-progress --log-interval 100 --torchcompile "${extra[@]}" >> /work/runs/sd_resnet56_c10_sd.log 2>&1 &
echo started $!
