"""Class accuracy of toy-world pipelines on the quality bench's 24 drift probes, at several guidance scales.

    python -m lab.benchmarks.class_accuracy tiny sdft-output/run/pipeline --guidance 1 7.5

Each model (`tiny`, a diffusers folder, or a folder from `python -m lab toy-base`) draws the bench's class prompts
("a {colour} {shape} on a {bg} background", the same 24 as `python -m lab bench-quality`) on fixed seeds, and the checker
scores colour, shape and background. Used for the base-robustness check in lab/FINDINGS.md: fine-tune a
base on its own class images, then compare its accuracy with the base's.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--guidance", type=float, nargs="+", default=[7.5])
    parser.add_argument("--samples-per-prompt", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()

    from finetune.models import load_pipeline
    from lab.toyworld.bench import class_prompt_set, generate_batched
    from lab.toyworld.checker import accuracy

    prompts = class_prompt_set(24)
    n = args.samples_per_prompt
    texts = [p for p, *_ in prompts for _ in range(n)]
    expected = [(c, s, b) for _, c, s, b in prompts for _ in range(n)]
    seeds = [2000 + k for _ in prompts for k in range(n)]  # the bench's class-prompt seeds
    for model in args.models:
        pipe = load_pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        for guidance in args.guidance:
            images = generate_batched(pipe, texts, seeds, args.steps, guidance, batch=len(texts))
            scores = {k: round(v, 4) for k, v in accuracy(images, expected).items()}
            print(json.dumps({"model": model, "guidance": guidance, "samples": len(images), **scores}), flush=True)


if __name__ == "__main__":
    main()
