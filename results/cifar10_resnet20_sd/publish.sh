#!/bin/bash
# How sd_zoo/weights/sd_resnet20.cifar10 was staged (run from the repository root): the last epoch's EMA
# weights of the run, validated on the shared CIFAR-10 test split for the card.
R=${1:-/work/runs/sd_resnet20_c10_sd}
DATA=${2:-/work/data/cifar10}
sd-zoo validate --model sd_resnet20 --checkpoint $R/last.pth.tar --use-ema --data-dir $DATA --split test \
  --results-file results/cifar10_resnet20_sd/validate_test_ema.json --overwrite
sd-zoo validate --model sd_resnet20 --checkpoint $R/last.pth.tar --data-dir $DATA --split test \
  --results-file results/cifar10_resnet20_sd/validate_test_raw.json --overwrite
sd-zoo publish $R --repo-id sd-zoo/sd_resnet20.cifar10 --checkpoint last --ema --dry-run \
  --out sd_zoo/weights/sd_resnet20.cifar10 --data-dir $DATA --split test \
  --data-note "The test images are the shared CIFAR-10 copy's JPEG re-encodings (about quality 75) of the 10,000 CIFAR-10 test images; training used the 50,000 training images of the same copy. An accuracy on this copy can differ from one on the original lossless images that the published numbers below use. These are the EMA weights of the last epoch, chosen before training: no checkpoint was chosen by test accuracy (the recipe evaluates 2,000 test images after each epoch only to log them). The raw (non-EMA) weights of the same epoch reach 87.98% top-1." \
  --train-note "Trained on a 2-core x86-64 CPU (torch 2.14.1, timm 1.0.31) with \`sd-zoo train --config cifar10_resnet20_sd\` (the recipe ships in the package: \`sd-zoo recipes --path cifar10_resnet20_sd\`), on the in-memory loader. The run was stopped after epoch 20 and continued with \`--resume\`; epochs 0-20 ran beside other work on the same cores (epochs 8-20 most: 314-669 s, epoch 18 1,856 s, epoch 20 965 s with a pause, against about 115-130 s undisturbed in epochs 21-49), so the total overstates the training time and the median epoch is the fairer time. This misses the 91.0% target the project set for these weights by 2.85 points (50 epochs on a CPU budget, against the 164 epochs of He et al.). No constant-depth twin of this recipe has been trained yet."
sd-zoo validate --model sd_resnet20.cifar10 --pretrained --data-dir $DATA --split test --subset 2000 --seed 0 \
  --results-file results/cifar10_resnet20_sd/validate_test_subset2000.json --overwrite
