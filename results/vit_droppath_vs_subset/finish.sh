#!/bin/bash
# After run.sh (at each rate that ran): copy each run's records here and validate its last-epoch weights on the
# full test split, then write table.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-/work/runs/vit_cmp}
DATA=${DATA:-/work/data/cifar10}
H=results/vit_droppath_vs_subset
export SD_ZOO_CACHE=${SD_ZOO_CACHE:-/work/cache}
for suffix in "" _dp04; do
  [[ -z $suffix || -d $OUT/vit_droppath_seed0$suffix ]] || continue
  for seed in 0 1; do
    for mode in droppath subset; do
      name=vit_${mode}_seed$seed$suffix; R=$OUT/$name
      [[ -f $R/results.json ]] || { echo "$R has not finished (bash $H/run.sh continues it)"; exit 1; }
      mkdir -p "$H/$name"
      for f in args.yaml summary.csv epochs.csv results.json; do cp "$R/$f" "$H/$name/"; done
      cp "$OUT/$name.log" "$H/$name/train.log"
      [[ -f $H/$name/validate_test.json ]] && continue
      model=vit_tiny_patch16_224; [[ $mode == subset ]] && model=vit_tiny_patch16_224_sd
      .venv/bin/sd-zoo validate --model "$model" --checkpoint "$R/last.pth.tar" --data-dir "$DATA" --split test \
        --results-file "$H/$name/validate_test.json" --overwrite
    done
  done
done
.venv/bin/python "$H/summarize.py" > "$H/table.md"
cat "$H/table.md"
