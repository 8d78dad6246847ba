"""Epoch time with and without VAE latent caching, on an SD1.5-shaped random pipeline (no download).

    python -m lab.benchmarks.latent_cache --resolution 256 --epochs 2 --repeats 3

Trains LoRA (attn, rank 4, batch 1, fp32) for `--epochs` epochs over `--images` (default: the repository's
example photos, data_examples/photos, 5 JPEGs) in three modes, each on a fresh copy of the same random pipeline:

- `off`:    --no-cache-latents: every step encodes its image with the VAE
- `memory`: the default: every image is encoded once before step 1, epochs reuse the latents
- `disk`:   --latent-cache-dir already filled by an earlier run: no encode at all

and reports, per mode, the first epoch (cache fill and the first step's warm-up included) and a later epoch
(images x the median step time), as medians over repeats. One JSON line per run, then a summary line per mode.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PHOTOS = REPO / "data_examples" / "photos"  # the example photos; any folder works (--images)


def run_mode(components, mode: str, images: Path, resolution: int, epochs: int, cache_dir: Path) -> dict:
    """One LoRA run in `mode`; returns the trainer's timings split into epochs."""
    from finetune.config import RunConfig
    from finetune.trainer import run_training

    count = len([p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")])
    config = RunConfig.for_method("lora")
    config.data.images = str(images)
    config.data.class_word = "dog"
    config.data.resolution = resolution
    config.data.random_flip = False  # one latent per image, so "an epoch" means the same work in every mode
    config.data.cache_latents = mode != "off"
    config.data.latent_cache_dir = str(cache_dir) if mode == "disk" else None
    config.train.steps = epochs * count
    config.train.batch_size = 1
    config.train.lr = 1e-5
    config.prior.enabled = False
    config.output.output = tempfile.mkdtemp(prefix=f"sdft-cache-{mode}-")
    config.output.sample_seeds = []
    config.output.formats = []
    summary = run_training(config, copy.deepcopy(components)).summary
    shutil.rmtree(config.output.output, ignore_errors=True)
    # A steady epoch is `count` median steps; the first epoch adds the cache fill and the first step's warm-up.
    steady = summary["median_step_s"] * count
    first = summary["cache_fill_s"] + summary["first_step_s"] + summary["median_step_s"] * (count - 1)
    return {"mode": mode, "images": count, "vae_encodes": summary["vae_encodes"],
            "cache_fill_s": summary["cache_fill_s"], "first_step_s": summary["first_step_s"],
            "first_epoch_s": round(first, 2), "later_epoch_s": round(steady, 2),
            "median_step_s": summary["median_step_s"], "train_loop_s": summary["train_loop_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=Path, default=PHOTOS)
    parser.add_argument("--base-dir", type=Path, default=Path(tempfile.gettempdir()) / "sdft-random-sd15",
                        help="the random SD1.5-shaped pipeline, saved once (shared with real_size.py)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: what accelerate picks)")
    args = parser.parse_args()
    if args.device == "cpu":
        import os

        os.environ["ACCELERATE_USE_CPU"] = "true"

    from finetune.models import load_components
    from real_size import ensure_base

    components = load_components(str(ensure_base(args.base_dir)))
    cache_dir = Path(tempfile.mkdtemp(prefix="sdft-latents-"))
    # Fill the disk cache once, untimed, so the `disk` mode measures a warm cache.
    run_mode(components, "disk", args.images, args.resolution, 1, cache_dir)
    rows: dict[str, list[dict]] = {"off": [], "memory": [], "disk": []}
    for repeat in range(args.repeats):
        for mode in rows:
            row = run_mode(components, mode, args.images, args.resolution, args.epochs, cache_dir)
            rows[mode].append(row)
            print(json.dumps({"repeat": repeat, **row}), flush=True)
    off_later = statistics.median(r["later_epoch_s"] for r in rows["off"])
    for mode, runs in rows.items():
        first = statistics.median(r["first_epoch_s"] for r in runs)
        later = statistics.median(r["later_epoch_s"] for r in runs)
        print(json.dumps({"summary": True, "mode": mode, "resolution": args.resolution, "first_epoch_s": first,
                          "later_epoch_s": later, "later_epoch_vs_off": round(later / off_later, 3),
                          "vae_encodes": runs[0]["vae_encodes"]}), flush=True)


if __name__ == "__main__":
    main()
