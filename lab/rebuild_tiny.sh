#!/usr/bin/env bash
# Rebuild the shipped `tiny` base (v5) from scratch: the seven-stage chain, ~2.7 h on 2 CPU cores.
#   bash lab/rebuild_tiny.sh OUT      (run from the repository root; OUT/stage9 is the base)
# The chain ran before the one-run recipe became `python -m lab toy-base`'s default, so OLD spells out the
# defaults of its time; each stage's own flags come after it and win. Stage configs: lab/toy_base_stages/.
# Reruns repeat a stage exactly only on the same CPU type, thread count and torch version.
set -euo pipefail
out=${1:?usage: bash lab/rebuild_tiny.sh OUT}
run() { python -m lab toy-base --threads 2 --seed 0 --vae-steps 800 --vae-crop-fraction 0.8 --unet-steps 1950 \
  --noise-offset 0 --sample-posterior --precision fp32 --no-fused-optimizer --main-caption-rate 0 \
  --main-caption-start "$1" "${@:2}"; }
tuned="--unet-lr 5e-4 --unet-min-lr 5e-5 --unet-warmup 50 --no-sample-posterior"
late="--unet-lr 3e-4 --unet-min-lr 3e-5 --unet-warmup 50 --no-sample-posterior --noise-offset 0.1"
run 0 --output "$out/stage1"
run 0 --output "$out/stage2" --init-from "$out/stage1" --unet-steps 900 $tuned
run 0 --output "$out/stage3" --init-from "$out/stage2" --unet-steps 900 $tuned
run 0 --output "$out/stage4" --init-from "$out/stage3" --seed 1 --unet-steps 1000 $tuned
run 0 --output "$out/stage7" --init-from "$out/stage4" --seed 2 --unet-steps 900 $late
run 0 --output "$out/stage8" --init-from "$out/stage7" --seed 3 --images 6000 --unet-steps 0 --decoder-steps 1000 \
  --decoder-lr 1e-3 --decoder-crop-fraction 0.5
run 0.5 --output "$out/stage9" --init-from "$out/stage8" --seed 4 --unet-steps 800 $late --main-caption-rate 0.5
python -m lab score-base "$out/stage9" --seeds 7 100 101
