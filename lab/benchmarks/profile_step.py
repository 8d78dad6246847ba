"""Where a training step's time goes: the trainer's loop vs the bare loop of overhead.py, by function.

    python -m lab.benchmarks.profile_step --method lora --base /tmp/sdft-random-sd15 --resolution 256 --steps 6

Runs both loops under cProfile on the same base and prints, for a fixed list of the functions a step is made
of (UNet forward, backward, optimizer, clipping, text encoder, ...), the seconds per step each loop spends
in them, then both loops' step times and their 25 costliest functions. Used to explain an overhead ratio above
1.10x.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import time

from lab.benchmarks.overhead import bare_step_times, comparison_config, load_base

# (label, file suffix, function name) as cProfile names them; cumulative time, so nested entries overlap.
PARTS = [
    ("unet forward", "unet_2d_condition.py", "forward"),
    ("autograd backward", "graph.py", "_engine_run_backward"),
    ("optimizer step", "adam.py", "adam"),
    ("clip grad norm", "clip_grad.py", "clip_grad_norm_"),
    ("text encoder forward", "modeling_clip.py", "forward"),
    ("tokenizer", "tokenization_utils_base.py", "__call__"),
    ("vae encode", "autoencoder_kl.py", "encode"),
    ("add noise", "scheduling_ddpm.py", "add_noise"),
    ("lr scheduler", "lr_scheduler.py", "step"),
    ("accelerate backward", "accelerator.py", "backward"),
    ("tensorboard / trackers", "accelerator.py", "log"),
    ("tqdm", "std.py", "update"),
    ("min-SNR weights", "losses.py", "min_snr_weights"),
]


def part_seconds(profile: cProfile.Profile) -> dict[str, float]:
    """Cumulative seconds of each PARTS entry (the outermost call only for recursive functions)."""
    stats = pstats.Stats(profile).stats  # {(file, line, name): (calls, primitive, tottime, cumtime, callers)}
    found: dict[str, float] = {}
    for label, file_suffix, name in PARTS:
        total = 0.0
        for (file, _, func), (_, _, _, cumtime, _) in stats.items():
            if func == name and file.endswith(file_suffix):
                # modeling_clip has several forward()s nested in each other: keep the largest (the outermost).
                total = max(total, cumtime) if file_suffix == "modeling_clip.py" else total + cumtime
        found[label] = total
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="lora")
    parser.add_argument("--base", default="tiny")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--bare-before", action="store_true",
                        help="also time a bare loop before the trainer (on its own copy of the base): shows whether "
                             "the gap follows the loop or the order (allocator warm-up)")
    args = parser.parse_args()

    import torch

    from finetune.trainer import run_training

    components = load_base(args.base)
    config = comparison_config(args.method, args.resolution, args.steps, prefix="sdft-profile-")
    resolution = args.resolution or components.resolution

    bare_before = None
    if args.bare_before:
        from finetune.strategies import build_strategy

        early = load_base(args.base)
        early_strategy = build_strategy(config)
        early_strategy.prepare(early)
        bare_before = bare_step_times(early, early_strategy, 1, resolution, args.steps,
                                      next(early.unet.parameters()).device)
        early = early_strategy = None

    trainer_profile = cProfile.Profile()
    trainer_profile.enable()
    outcome = run_training(config, components)
    trainer_profile.disable()
    shutil.rmtree(config.output.output, ignore_errors=True)  # the exports are not what is measured
    summary = outcome.summary
    trainer_loop = summary["train_loop_s"]

    bare_profile = cProfile.Profile()
    started = time.perf_counter()
    bare_profile.enable()
    bare = bare_step_times(components, outcome.strategy, 1, resolution, args.steps,
                           next(components.unet.parameters()).device)
    bare_profile.disable()
    bare_total = time.perf_counter() - started

    trainer_parts, bare_parts = part_seconds(trainer_profile), part_seconds(bare_profile)
    for label, *_ in PARTS:
        print(json.dumps({"part": label, "trainer_s_per_step": round(trainer_parts[label] / args.steps, 4),
                          "bare_s_per_step": round(bare_parts[label] / args.steps, 4)}))
    print(json.dumps({"summary": True, "method": args.method, "base": args.base, "resolution": resolution,
                      "steps": args.steps, "threads": torch.get_num_threads(),
                      "trainer_loop_s_per_step": round(trainer_loop / args.steps, 4),
                      "trainer_median_step_s": summary["median_step_s"],
                      "bare_s_per_step": round(bare_total / args.steps, 4),
                      "bare_median_step_s": round(sorted(bare)[len(bare) // 2], 4),
                      "bare_before_median_step_s": (round(sorted(bare_before)[len(bare_before) // 2], 4)
                                                    if bare_before else None)}))
    print("\ntop 25 functions of the trainer run by own time:")
    pstats.Stats(trainer_profile).sort_stats("tottime").print_stats(25)
    print("\ntop 25 functions of the bare loop by own time:")
    pstats.Stats(bare_profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
