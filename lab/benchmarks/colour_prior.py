"""What a toy base (or a fine-tune of it) draws for prompts: colour, shape, background and star counts, a line each.

By default it asks which colour and shape the base picks when a prompt leaves them out:

    python -m lab.benchmarks.colour_prior tiny --samples 24
    python -m lab.benchmarks.colour_prior /path/from/sdft-toy-base --samples 24
    python -m lab.benchmarks.colour_prior RUN/pipeline --prompts "sks on a black background" --guidance 2 4 7.5

Any pipeline folder works (a fine-tune's `pipeline/` too); `--prompts` replaces the default ones, and each line
also counts strict stars, so a trained concept can be probed by phrasing and guidance.

The toy world's renders spread colours evenly over backgrounds, so an unbiased base would answer "a photo of a
shape on a black background" with all six colours. A base that collapses onto one or two colours there
(classifier-free guidance sharpens whatever preference the model has) is what a fine-tuned concept must overcome
on that background; the last two default prompts ask for an unknown token, as a fine-tune's do before training.
"""

from __future__ import annotations

import argparse
import collections
import json

PROMPTS = (
    "a photo of a shape on a black background",
    "a photo of a shape on a white background",
    "a photo of a shape on a gray background",
    "a photo of a shape on a pink background",
    "a photo of sks on a black background",
    "a photo of sks on a white background",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="tiny",
                        help="tiny, a folder from `python -m lab toy-base` or any pipeline folder")
    parser.add_argument("--samples", type=int, default=24, help="images per prompt and guidance")
    parser.add_argument("--first-seed", type=int, default=0, help="sampling seeds first-seed .. first-seed+N-1")
    parser.add_argument("--guidance", type=float, nargs="+", default=[7.5])
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS))
    args = parser.parse_args()

    from finetune.models import load_pipeline
    from lab.toyworld.bench import generate_batched
    from lab.toyworld.checker import check

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    seeds = list(range(args.first_seed, args.first_seed + args.samples))
    count = lambda values: dict(collections.Counter(str(v) for v in values).most_common())  # noqa: E731
    for prompt in args.prompts:
        for guidance in args.guidance:
            images = generate_batched(pipe, [prompt] * args.samples, seeds, steps=25, guidance=guidance,
                                      batch=args.samples)
            verdicts = [check(image) for image in images]
            print(json.dumps({"prompt": prompt, "guidance": guidance, "stars": sum(v.star for v in verdicts),
                              "colours": count(v.colour for v in verdicts), "shapes": count(v.shape for v in verdicts),
                              "backgrounds": count(v.background for v in verdicts)}), flush=True)


if __name__ == "__main__":
    main()
