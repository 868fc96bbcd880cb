#!/bin/bash
# When the run is done (run from the repository root; waits while it is still training): publish.sh (validate
# the last epoch's EMA and raw weights on the full test split, stage sd_zoo/weights/sd_resnet56.cifar10), ship
# the weights (SHIPPED_WEIGHTS), then the fixed-subset validate whose top-1 goes into the tests and README.
set -euo pipefail
R=${1:-/work/runs/sd_resnet56_c10_sd}
DATA=${2:-/work/data/cifar10}
H=results/cifar10_resnet56_sd
while pgrep -f "sd-zoo train --config cifar10_resnet56_sd" > /dev/null; do sleep 20; done
[[ -f $R/results.json ]] || { echo "$R has no results.json: the run has not finished (resume it with restart.sh resume)"; exit 1; }
bash $H/publish.sh "$R" "$DATA"
sed -i "s/^SHIPPED_WEIGHTS = ('sd_resnet20.cifar10',)$/SHIPPED_WEIGHTS = ('sd_resnet20.cifar10', 'sd_resnet56.cifar10')/" \
  sd_zoo/models/sd_resnet_cifar.py
grep -q "'sd_resnet56.cifar10')" sd_zoo/models/sd_resnet_cifar.py || { echo "SHIPPED_WEIGHTS not updated"; exit 1; }
SD_ZOO_CACHE=${SD_ZOO_CACHE:-/work/cache} ${SDZOO:-.venv/bin/sd-zoo} validate --model sd_resnet56.cifar10 --pretrained \
  --data-dir "$DATA" --split test --subset 2000 --seed 0 --results-file $H/validate_test_subset2000.json --overwrite
echo "Next: STATED_SUBSET_TOP1 in tests/test_pretrained.py, the README weights and recipe tables, $H/README.md."
