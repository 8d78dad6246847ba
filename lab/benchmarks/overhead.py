"""Trainer overhead: sdft's step time vs a bare UNet forward+backward+optimizer step on the same batch.

    python -m lab.benchmarks.overhead --method lora --base tiny --steps 30 --repeats 3
    python -m lab.benchmarks.overhead --method lora --base sd15 --resolution 256 --steps 5 --repeats 3

`--base sd15` builds a randomly initialised SD1.5-shaped pipeline in memory (no download); 256 px gives
32x32 latents. Prints one JSON line per run and a summary line with the medians and their ratio.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def bare_step_times(components, strategy, batch_size: int, resolution: int, steps: int, device) -> list[float]:
    """The floor: one fixed batch, no data pipeline, just UNet forward, MSE, backward and AdamW."""
    latent = resolution // (2 ** (len(components.vae.config.block_out_channels) - 1))
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(batch_size, 4, latent, latent, generator=gen).to(device)
    noise = torch.randn(latents.shape, generator=gen).to(device)
    timesteps = torch.randint(0, 1000, (batch_size,), generator=gen).to(device)
    ids = components.tokenizer(["a photo of sks"] * batch_size, padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = components.text_encoder(ids.to(device))[0]
    optimizer = torch.optim.AdamW(strategy.param_groups())
    params = [p for g in optimizer.param_groups for p in g["params"]]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        noisy = components.noise_scheduler.add_noise(latents, noise, timesteps)
        if strategy.trains_text_encoder():
            hidden = components.text_encoder(ids.to(device))[0]
        pred = components.unet(noisy, timesteps, hidden).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def comparison_config(method: str, resolution: int | None, steps: int, batch_size: int = 1, prefix: str = "sdft-bench-"):
    """The trainer side of a trainer-vs-bare comparison: the example star images, no prior, no samples."""
    from finetune.config import RunConfig

    config = RunConfig.for_method(method)
    config.data.images = str(REPO / "data_examples" / "star")
    config.data.class_word = "star"
    config.data.resolution = resolution
    config.train.steps = steps
    config.train.batch_size = batch_size
    config.train.lr = 1e-5  # small: keep weights sane; speed does not depend on it
    config.prior.enabled = False  # the bare loop has no class batch: compare equal batches
    config.output.output = tempfile.mkdtemp(prefix=prefix)
    config.output.sample_seeds = []
    config.output.formats = []
    return config


def load_base(base: str):
    """`tiny`, `sd15` (a random SD1.5-shaped pipeline built in memory) or a saved pipeline folder, e.g. the
    random one lab.benchmarks.real_size saves (loading it takes seconds; building it here takes minutes)."""
    from finetune.models import components_from_pipeline, load_components
    from lab.random_bases import build_random_pipeline

    if base == "sd15":
        return components_from_pipeline(build_random_pipeline(base), f"random-{base} (in memory)")
    return load_components(base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="lora")
    parser.add_argument("--base", default="tiny", help="tiny, sd15 (random, built in memory) or a pipeline folder")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run (the first is dropped)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: what accelerate picks)")
    args = parser.parse_args()

    from finetune.trainer import run_training

    if args.device == "cpu":
        import os

        os.environ["ACCELERATE_USE_CPU"] = "true"
    trainer_medians, bare_medians = [], []
    for repeat in range(args.repeats):
        components = load_base(args.base)
        config = comparison_config(args.method, args.resolution, args.steps, args.batch_size)
        resolution = args.resolution or components.resolution
        bare_first = repeat % 2 == 1  # alternate which loop runs first: warm caches must not favour one side
        if bare_first:
            from finetune.strategies import build_strategy

            device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
            strategy = build_strategy(config)
            strategy.prepare(components)
            for module in (components.unet, components.text_encoder, *strategy.trainable_modules()):
                module.to(device)
            bare = bare_step_times(components, strategy, args.batch_size, resolution, args.steps, device)
            components = load_base(args.base)  # the trainer gets an untouched base
        outcome = run_training(config, components)
        shutil.rmtree(config.output.output, ignore_errors=True)  # exports of an 860M UNet fill a disk in a few repeats
        trainer_step = outcome.summary["median_step_s"]
        device = next(components.unet.parameters()).device
        if not bare_first:
            bare = bare_step_times(components, outcome.strategy, args.batch_size, resolution, args.steps, device)
        bare_step = statistics.median(bare[1:])
        trainer_medians.append(trainer_step)
        bare_medians.append(bare_step)
        print(json.dumps({"repeat": repeat, "method": args.method, "base": args.base, "resolution": resolution,
                          "trainer_step_s": round(trainer_step, 4), "bare_step_s": round(bare_step, 4),
                          "first": "bare" if bare_first else "trainer"}), flush=True)
        # Free this repeat's models before the next one loads: at SD1.5 shape a DreamBooth repeat holds ~14 GB
        # (weights, gradients, AdamW state), and two of them exceed a 24 GB machine.
        outcome = strategy = components = None
        gc.collect()
    trainer, bare = statistics.median(trainer_medians), statistics.median(bare_medians)
    # Each repeat pairs the two loops on the same base within minutes; the median of those paired ratios is less
    # exposed to this VM's drifting speed than the ratio of the two medians (which mixes repeats).
    paired = statistics.median(t / b for t, b in zip(trainer_medians, bare_medians))
    print(json.dumps({"summary": True, "method": args.method, "base": args.base, "trainer_step_s": round(trainer, 4),
                      "bare_step_s": round(bare, 4), "overhead_ratio": round(trainer / bare, 3),
                      "median_paired_ratio": round(paired, 3)}))


if __name__ == "__main__":
    main()
