#!/bin/bash
# Issue 27: timm's DropPath against sd-zoo's subset gates (the branch runs on the kept samples only) at the same
# rate, on a tiny ViT trained from scratch on the shared CIFAR-10 at 32 px, two seeds each, same recipe.
# Usage (from the repository root): bash results/vit_droppath_vs_subset/run.sh [OUT]   (OUT: /work/runs/vit_cmp)
# RATE (default 0.1, the recipe's) is the drop path rate; runs at another rate are named ..._dp04 for 0.4.
# THREADS (default 1) torch threads per run; the four runs go one after another. A run already finished is
# skipped; a run interrupted is resumed from its last.pth.tar.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-/work/runs/vit_cmp}
DATA=${DATA:-/work/data/cifar10}
RATE=${RATE:-0.1}
export OMP_NUM_THREADS=${THREADS:-1} SD_ZOO_CACHE=${SD_ZOO_CACHE:-/work/cache}
suffix=; [[ $RATE != 0.1 ]] && suffix=_dp${RATE/./}
common=(--config results/vit_droppath_vs_subset/recipe.yaml --data-dir "$DATA" --no-progress --log-interval 50
        --drop-path "$RATE")
mkdir -p "$OUT"
for seed in 0 1; do
  for mode in droppath subset; do
    name=vit_${mode}_seed$seed$suffix
    if [[ $mode == droppath ]]; then model=(--model vit_tiny_patch16_224 --model-kwargs img_size=32 patch_size=4 depth=6)
    else model=(--model vit_tiny_patch16_224_sd --model-kwargs img_size=32 patch_size=4 depth=6 sd_granularity=subset); fi
    if [[ -f $OUT/$name/results.json ]]; then continue; fi
    if [[ -f $OUT/$name/last.pth.tar ]]; then where=(--resume "$OUT/$name/last.pth.tar")
    else where=(--output "$OUT" --experiment "$name"); fi
    .venv/bin/sd-zoo train "${common[@]}" "${model[@]}" --seed "$seed" "${where[@]}" >> "$OUT/$name.log" 2>&1
  done
done
