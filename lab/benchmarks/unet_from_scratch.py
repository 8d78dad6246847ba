"""Diagnostic for the one-run pretraining recipe: a fresh text encoder + UNet on the shipped base's VAE.

    python -m lab.benchmarks.unet_from_scratch OUT [any `python -m lab toy-base` flag, e.g. --unet-steps 1000 --unet-batch 32
        --main-caption-rate 0.5 --no-sample-posterior]
    python -m lab score-base OUT --seeds 7 100 101          # the toy base README's 288-sample accuracy

`python -m lab toy-base` from scratch spends ~10-16 min of a run on the VAE before the UNet learns anything. This script
skips that stage (it takes the VAE, with its scaling factor, from the built-in base) so UNet recipes (batch,
caption mix, lr, steps) can be compared at ~20 min a try. The text encoder and UNet start from the same random
weights as `python -m lab toy-base --seed S`. OUT loads like any `python -m lab toy-base` folder (`--model OUT`). The flags'
defaults are `python -m lab toy-base`'s (the one-run recipe: bf16, a caption curriculum); to compare with fp32 and
a constant caption share, pass --precision fp32 --no-fused-optimizer --main-caption-start R (R = --main-caption-rate).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path


def main() -> None:
    from lab.cli import add_dataclass_flags, dataclass_from_args
    from lab.toyworld.settings import PretrainConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="folder for the fp16 pipeline parts")
    add_dataclass_flags(parser, PretrainConfig)
    args = parser.parse_args()
    cfg = dataclass_from_args(PretrainConfig, args)

    import torch

    from finetune.models import build_toy_pipeline, quiet_hf_progress_bars, shipped_toy_base
    from lab.random_bases import build_random_pipeline
    from lab.toyworld.pretrain import encode_pool, prepare_for_precision, render_pool, save_toy_base, train_unet

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    quiet_hf_progress_bars()
    started = time.time()
    pipe = build_random_pipeline("tiny", seed=cfg.seed)
    pipe.vae = build_toy_pipeline(shipped_toy_base()).vae.float()  # its scaling_factor comes along
    prepare_for_precision(pipe, cfg)
    pool, scenes = render_pool(cfg.images, cfg.seed)
    means, stds = encode_pool(pipe.vae, pool)
    if not cfg.sample_posterior:
        stds = torch.zeros_like(stds)
    encoded = time.time() - started
    print(f"rendered and encoded {len(pool)} images in {encoded:.0f} s")
    train_unet(pipe, means, stds, scenes, cfg, print, "cpu")
    output = Path(args.output)
    save_toy_base(pipe, output)
    report = {"config": asdict(cfg), "vae": "shipped toy base", "encode_s": round(encoded, 1),
              "unet_s": round(time.time() - started - encoded, 1), "torch": torch.__version__}
    (output / "pretrain.json").write_text(json.dumps(report, indent=2))
    print(f"saved to {output} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
