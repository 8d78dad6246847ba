"""How many rendered concept stars survive a round trip through a base's VAE as strict stars, per background.

    python -m lab.benchmarks.vae_ceiling tiny --count 40

A fine-tune can only draw what the decoder can show: if the VAE already loses the star (its tips) or its colour
on one background, no training recipe gets past that share there. Each image is a render like the bench's concept
images (an orange star, 30-46 px, random position), encoded to its posterior mean and decoded again; the checker
scores the render and the reconstruction.
"""

from __future__ import annotations

import argparse
import collections
import json
import random


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", nargs="?", default="tiny", help="'tiny' or a folder from `python -m lab toy-base`")
    parser.add_argument("--count", type=int, default=40, help="renders per background")
    parser.add_argument("--colour", default="orange")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from finetune.data import to_training_tensor
    from finetune.models import load_components
    from lab.toyworld.bench import TRAIN_BACKGROUNDS, concept_scene
    from lab.toyworld.checker import check
    from lab.toyworld.world import BACKGROUNDS, render

    vae = load_components(args.base).vae
    rng = random.Random(args.seed)
    for background in BACKGROUNDS:
        rendered = survived = 0
        seen = collections.Counter()
        for _ in range(args.count):
            image = render(concept_scene(rng, args.colour, background))
            verdict = check(image)
            rendered += verdict.star and verdict.colour == args.colour
            with torch.no_grad():
                latents = vae.encode(to_training_tensor(image, 64)[None]).latent_dist.mean
                decoded = vae.decode(latents).sample.clamp(-1, 1)[0]
            pixels = ((decoded.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().astype(np.uint8)
            verdict = check(Image.fromarray(pixels))
            survived += verdict.star and verdict.colour == args.colour
            seen[f"{verdict.colour} {'star' if verdict.star else verdict.shape}"] += 1
        print(json.dumps({"background": background, "trained_on": background in TRAIN_BACKGROUNDS,
                          "renders_strict": rendered / args.count, "reconstructions_strict": survived / args.count,
                          "reconstructions": dict(seen.most_common())}))


if __name__ == "__main__":
    main()
