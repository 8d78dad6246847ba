"""Seconds per step of the toy base's text-encoder + UNet pretraining, split into forward, backward and optimizer.

    python -m lab.benchmarks.pretrain_step_time --batch 64 --threads 2
    python -m lab.benchmarks.pretrain_step_time --batch 64 --threads 2 --precision bf16 --fused-optimizer

Times the step `python -m lab toy-base` repeats (lab/toyworld/pretrain.py::train_unet: both models trained, AdamW,
gradient clipping) on randomly initialised models of the toy base's shape, once with every weight trained and once
with the 49408 x 64 token embedding frozen, to see what the embedding's dense update costs. The caption tokens and
latents are fixed: data preparation is measured apart (tokenising 64 captions takes ~5 ms). `--precision bf16`
and `--fused-optimizer` time `python -m lab toy-base`'s flags of the same names (bf16 autocast with diffusers' plain
attention processor in the UNet, torch's fused AdamW).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def time_steps(pipe, batch: int, steps: int, freeze_embedding: bool, cfg) -> dict[str, float]:
    """Mean seconds per step for each part, after one warm-up step (cfg: the PretrainConfig's precision and
    optimizer flags)."""
    from lab.toyworld.pretrain import build_adamw, precision_autocast

    unet, text_encoder = pipe.unet, pipe.text_encoder
    unet.train()
    text_encoder.train()
    text_encoder.get_input_embeddings().weight.requires_grad_(not freeze_embedding)
    params = [p for p in list(unet.parameters()) + list(text_encoder.parameters()) if p.requires_grad]
    optimizer = build_adamw(params, cfg, 1e-4, 1e-2)
    ids = pipe.tokenizer(["a photo of a red circle on a pink background"] * batch, padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    latents = torch.randn(batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    timesteps = torch.randint(0, 1000, (batch,))
    totals = {"forward_s": 0.0, "backward_s": 0.0, "optimizer_s": 0.0}
    for step in range(steps + 1):
        started = time.perf_counter()
        with precision_autocast(cfg, "cpu"):
            pred = unet(latents, timesteps, text_encoder(ids)[0]).sample.float()
        loss = F.mse_loss(pred, latents)
        forward_done = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        backward_done = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step:  # the first step allocates buffers and optimizer state
            totals["forward_s"] += forward_done - started
            totals["backward_s"] += backward_done - forward_done
            totals["optimizer_s"] += time.perf_counter() - backward_done
    means = {key: round(value / steps, 3) for key, value in totals.items()}
    means["step_s"] = round(sum(means.values()), 3)
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--fused-optimizer", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from lab.random_bases import build_random_pipeline
    from lab.toyworld.pretrain import prepare_for_precision
    from lab.toyworld.settings import PretrainConfig

    cfg = PretrainConfig(precision=args.precision, fused_optimizer=args.fused_optimizer)
    pipe = build_random_pipeline("tiny", seed=0)
    prepare_for_precision(pipe, cfg)
    report = {"batch": args.batch, "threads": torch.get_num_threads(), "precision": args.precision,
              "fused_optimizer": args.fused_optimizer,
              "all_trained": time_steps(pipe, args.batch, args.steps, False, cfg),
              "token_embedding_frozen": time_steps(pipe, args.batch, args.steps, True, cfg)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
