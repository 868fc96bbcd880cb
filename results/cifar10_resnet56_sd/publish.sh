#!/bin/bash
# Prepared for when the run is done (run from the repository root): validate the last epoch's EMA and raw
# weights on the shared CIFAR-10 test split and stage sd_zoo/weights/sd_resnet56.cifar10.
# The notes are filled from the measured JSONs; read the card before committing.
set -euo pipefail
R=${1:-/work/runs/sd_resnet56_c10_sd}
DATA=${2:-/work/data/cifar10}
H=results/cifar10_resnet56_sd
SDZOO=${SDZOO:-.venv/bin/sd-zoo}
export SD_ZOO_CACHE=${SD_ZOO_CACHE:-/work/cache}
for f in args.yaml summary.csv epochs.csv results.json; do cp "$R/$f" "$H/"; done
cp "$R.log" "$H/train.log"
"$SDZOO" validate --model sd_resnet56 --checkpoint "$R/last.pth.tar" --use-ema --data-dir "$DATA" --split test \
  --results-file "$H/validate_test_ema.json" --overwrite
"$SDZOO" validate --model sd_resnet56 --checkpoint "$R/last.pth.tar" --data-dir "$DATA" --split test \
  --results-file "$H/validate_test_raw.json" --overwrite
top1() { .venv/bin/python -c "import json,sys; print('%.2f' % json.load(open(sys.argv[1]))['top1'])" "$1"; }
EMA=$(top1 "$H/validate_test_ema.json"); RAW=$(top1 "$H/validate_test_raw.json")
VERDICT=$(.venv/bin/python -c "e=float('$EMA'); print('This reaches the 93.0% target the project set for these weights.' if e >= 93.0 else f'This misses the 93.0% target the project set for these weights by {93.0 - e:.2f} points (50 epochs on a CPU budget, against the 164 epochs of He et al.).')")
"$SDZOO" publish "$R" --repo-id sd-zoo/sd_resnet56.cifar10 --checkpoint last --ema --dry-run \
  --out sd_zoo/weights/sd_resnet56.cifar10 --data-dir "$DATA" --split test \
  --data-note "The test images are the shared CIFAR-10 copy's JPEG re-encodings (about quality 75) of the 10,000 CIFAR-10 test images; training used the 50,000 training images of the same copy. An accuracy on this copy can differ from one on the original lossless images that the published numbers below use. These are the EMA weights of the last epoch, chosen before training: no checkpoint was chosen by test accuracy (the recipe evaluates 2,000 test images after each epoch only to log them). The raw (non-EMA) weights of the same epoch reach ${RAW}% top-1." \
  --train-note "Trained on a 2-core x86-64 CPU (torch 2.14.1, timm 1.0.31) with \`sd-zoo train --config cifar10_resnet56_sd --torchcompile\` (the recipe ships in the package: \`sd-zoo recipes --path cifar10_resnet56_sd\`), on the in-memory loader, over several sessions joined with \`--resume\`; some epochs ran beside other work on the same cores or include pauses for it (epochs 17, 19 and 32 include test and benchmark runs during which training was paused, for example epoch 17 at 3072 s; epochs 26-31 and 33-37 ran beside tests at 542-647 s; against about 420-500 s undisturbed), so the total overstates the training time and the median epoch is the fairer time. ${VERDICT} No constant-depth twin of this recipe has been trained."
echo "EMA $EMA raw $RAW. Next: add 'sd_resnet56.cifar10' to SHIPPED_WEIGHTS (sd_zoo/models/sd_resnet_cifar.py), then"
echo "  sd-zoo validate --model sd_resnet56.cifar10 --pretrained --data-dir $DATA --split test --subset 2000 --seed 0 \\"
echo "    --results-file $H/validate_test_subset2000.json --overwrite"
echo "and put its top1 in STATED_SUBSET_TOP1 (tests/test_pretrained.py) and the README weights table."
