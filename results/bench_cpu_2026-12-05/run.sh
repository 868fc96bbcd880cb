#!/bin/bash
# The benchmark figures of issues 26 and 27, on one idle 2-core CPU of the project's kind, one after another
# (about 50 min). Run from the repository root with nothing else running:
#   bash results/bench_cpu_2026-12-05/run.sh [OUT]     (OUT default: results/bench_cpu_2026-12-05)
# Each line writes its JSON (machine, versions, date, per-step spreads) and its printed table (.txt).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-results/bench_cpu_2026-12-05}
B=(.venv/bin/sd-zoo bench --overwrite)
# KEEP_DONE=1 keeps the JSONs already there (a run interrupted part way continues with the rest)
run() {
  local name=$1; shift
  if [[ ${KEEP_DONE:-} == 1 && -f $OUT/$name.json ]]; then echo "== $name: kept"; return; fi
  echo "== $name: sd-zoo bench $*"; "${B[@]}" "$@" --json "$OUT/$name.json" | tee "$OUT/$name.txt"
}
# sd_resnet110, batch 128, p_L 0.5 (the paper's CIFAR setting): every part, float32 then bf16 + channels-last
run sd_resnet110_fp32
run sd_resnet110_bf16_cl --amp --channels-last --skip ddp eval memory
# sd_resnet20 as the CIFAR recipes train it (channels-last; float32 and bf16)
run sd_resnet20_fp32_cl --model sd_resnet20 --channels-last --skip ddp eval memory
run sd_resnet20_bf16_cl --model sd_resnet20 --amp --channels-last --skip ddp eval memory
# issue 27: timm ViT / ConvNeXt, drop path 0.4, 112 px, batch 32 (a CPU-sized input): DropPath vs the gates
for m in vit_small_patch16_224 convnext_tiny; do
  run ${m}_fp32 --model $m --img-size 112 --batch-size 32 --drop-path 0.4 --steps 20
  run ${m}_bf16 --model $m --img-size 112 --batch-size 32 --drop-path 0.4 --steps 20 --amp
done
# compiled blocks (what sd-zoo train --torchcompile does), float32 and bf16 + channels-last
run sd_resnet110_fp32_compile --compile --skip train ddp eval memory --compile-steps 30
run sd_resnet110_bf16_cl_compile --amp --channels-last --compile --skip train ddp eval memory --compile-steps 30
# the ImageNet family at a CPU-sized input
run sd_resnet50_fp32 --model sd_resnet50 --batch-size 16 --img-size 128 --skip ddp eval memory
# the data path: whole epochs on the shared CIFAR-10 JPEG folder, both loaders (channels-last, float32 and bf16)
run data_fp32_cl --skip train ddp eval memory --channels-last --data-dir "${DATA:-/work/data/cifar10}"
run data_bf16_cl --skip train ddp eval memory --channels-last --amp --data-dir "${DATA:-/work/data/cifar10}"
