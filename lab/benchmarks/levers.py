"""What the trainer's speed levers (train section) buy on this machine, each against its off state.

    python -m lab.benchmarks.levers --levers fused_adamw channels_last --repeats 3

fused_adamw: one AdamW step over the SD1.5 UNet's 860M parameters (full DreamBooth's optimizer step), the
per-tensor loop (sdft's CPU default, torch's too) against the fused kernel (train.fused_optimizer=on).
channels_last: a UNet forward + backward at `--resolution` on the SD1.5-shaped UNet (batch 1, fp32), in the
default layout and in channels-last (train.channels_last). Median seconds over `--repeats` after one warm-up.
The UNet is built from its config on the spot (random weights; nothing is downloaded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, kernel choice
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _unet():
    from diffusers import UNet2DConditionModel

    from lab.random_bases import sd15_configs

    return UNet2DConditionModel(**sd15_configs()["unet"])


def fused_adamw(repeats: int) -> dict:
    unet = _unet()
    params = [p for p in unet.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    out = {"parameters": sum(p.numel() for p in params)}
    for name, kwargs in (("loop", {"foreach": False}), ("fused", {"fused": True})):
        optimizer = torch.optim.AdamW(params, lr=1e-6, **kwargs)
        out[f"{name}_s"] = round(_median_time(optimizer.step, repeats), 3)
        del optimizer
    out["fused_vs_loop"] = round(out["fused_s"] / out["loop_s"], 3)
    return out


def channels_last(repeats: int, resolution: int) -> dict:
    unet = _unet()
    latent = resolution // 8
    sample = torch.randn(1, 4, latent, latent)
    context = torch.randn(1, 77, unet.config.cross_attention_dim)
    t = torch.tensor([500])

    def step():
        unet.zero_grad(set_to_none=True)
        unet(sample, t, context).sample.float().pow(2).mean().backward()

    out = {"resolution": resolution, "default_s": round(_median_time(step, repeats), 3)}
    unet.to(memory_format=torch.channels_last)
    sample = sample.contiguous(memory_format=torch.channels_last)
    out["channels_last_s"] = round(_median_time(step, repeats), 3)
    out["channels_last_vs_default"] = round(out["channels_last_s"] / out["default_s"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levers", nargs="+", default=["fused_adamw", "channels_last"],
                        choices=("fused_adamw", "channels_last"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    for lever in args.levers:
        row = fused_adamw(args.repeats) if lever == "fused_adamw" else channels_last(args.repeats, args.resolution)
        print(json.dumps({"lever": lever, "threads": torch.get_num_threads(), **row}), flush=True)


if __name__ == "__main__":
    main()
