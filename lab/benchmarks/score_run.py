"""Score one trained model with the quality bench's own evaluation, outside `python -m lab bench-quality`.

    python -m lab.benchmarks.score_run RUN --token "sks" --bench BENCH_OUTPUT
    python -m lab.benchmarks.score_run PIPELINE_FOLDER --token "<sks> <sks>_1" --bench BENCH_OUTPUT
    python -m lab.benchmarks.score_run --sheets BENCH_OUTPUT/runs/*       # counts from concept sheets already written
    python -m lab.benchmarks.score_run tiny RUN... --guidance 5           # the base and runs at another guidance
    python -m lab.benchmarks.score_run RUN --token "<sks>" --bench BENCH_OUTPUT --scale 0.7   # a blended DreamBooth run

RUN is a `sdft train` output folder: its `pipeline/` if it has one (DreamBooth), else the base named in its
config.yaml with its pytorch_lora_weights.safetensors (and a pivotal run's learned_embeds.safetensors) loaded
by diffusers' own loaders (LoRA); a name without a run folder is a base. With --scale S a DreamBooth run is
loaded as `sdft generate --adapter RUN/pipeline --adapter-scale S` loads it: its base plus S times the fine-tune's
change of every weight (its new word as trained). The scores are
`lab.toyworld.bench.evaluate`'s (100 concept prompts, 96 class prompts, the bench's seeds), drift against
the base's class accuracy stored in BENCH_OUTPUT/results.json; a concept-sheet.png (a row of 25 per background)
is written into RUN. For every sheet, the checker's colour and shape counts per background row are printed:
what the table's single numbers hide (which backgrounds fail, and what is drawn there instead).
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path


def load_run(path: Path, scale: float | None = None):
    """A pipeline for a run folder or a pipeline folder (see the module docstring)."""
    import yaml

    from finetune.models import load_pipeline

    if scale is not None:  # a DreamBooth run blended into its base, as `sdft generate --adapter-scale` does
        from finetune.inference import load_adapter

        config = yaml.safe_load((path / "config.yaml").read_text())
        pipe = load_pipeline(config["model"]["name"])
        load_adapter(pipe, path / "pipeline", scale)
        return pipe

    if (path / "model_index.json").exists():
        return load_pipeline(str(path))
    if (path / "pipeline" / "model_index.json").exists():
        return load_pipeline(str(path / "pipeline"))
    if not (path / "config.yaml").exists():
        return load_pipeline(str(path))  # a base: "tiny" or a folder load_pipeline understands
    config = yaml.safe_load((path / "config.yaml").read_text())
    pipe = load_pipeline(config["model"]["name"])
    pipe.load_lora_weights(str(path / "pytorch_lora_weights.safetensors"))
    if (path / "learned_embeds.safetensors").exists():  # a pivotal run's word
        pipe.load_textual_inversion(str(path / "learned_embeds.safetensors"))
    return pipe


def sheet_counts(sheet_path: Path) -> dict[str, dict]:
    """Per background row of a concept sheet: the checker's colour and shape (or 'star') counts."""
    from PIL import Image

    from lab.toyworld.checker import check
    from lab.toyworld.world import BACKGROUNDS, IMAGE_SIZE as TILE  # sheets are grids of world images

    sheet = Image.open(sheet_path).convert("RGB")
    columns = sheet.width // TILE
    rows = {}
    for row, background in enumerate(BACKGROUNDS):
        verdicts = [check(sheet.crop((c * TILE, row * TILE, (c + 1) * TILE, (row + 1) * TILE)))
                    for c in range(columns)]
        rows[background] = {
            "background_right": sum(v.background == background for v in verdicts),
            "colours": dict(collections.Counter(str(v.colour) for v in verdicts).most_common()),
            "shapes": dict(collections.Counter("star" if v.star else str(v.shape) for v in verdicts).most_common()),
        }
    return rows


def print_counts(name: str, rows: dict[str, dict]) -> None:
    print(name)
    for background, row in rows.items():
        print(f"  {background:6s} background right {row['background_right']:2d}  colours {row['colours']}  "
              f"shapes {row['shapes']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run or pipeline folders (with --sheets: folders holding a sheet)")
    parser.add_argument("--token", default="sks", help="the trained word as it appears in prompts")
    parser.add_argument("--bench", help="a bench output folder: its results.json gives the base's class accuracy")
    parser.add_argument("--sheets", action="store_true", help="only count existing concept-sheet.png files")
    parser.add_argument("--guidance", type=float, default=None,
                        help="sample at this guidance instead of the bench's (the sheet is then concept-sheet-gG.png, "
                             "and drift needs --base-accuracy measured at the same guidance: score `tiny` itself)")
    parser.add_argument("--base-accuracy", type=float, default=None,
                        help="the base's class accuracy to compute drift against (default: the bench's results.json)")
    parser.add_argument("--scale", type=float, default=None,
                        help="a DreamBooth run's change of the base, scaled (the sheet is then concept-sheet-sS.png)")
    args = parser.parse_args()

    if not args.sheets:
        from finetune.plots import image_grid
        from lab.toyworld.bench import evaluate
        from lab.toyworld.settings import QualityBenchConfig

        cfg = QualityBenchConfig()
        base_accuracy = args.base_accuracy
        if base_accuracy is None and args.bench and args.guidance is None:
            base_accuracy = json.loads((Path(args.bench) / "results.json").read_text())["base"]["class_accuracy"]
        if args.guidance is not None:
            cfg.guidance = args.guidance
    sheet_name = "concept-sheet" + ("" if args.guidance is None else f"-g{args.guidance:g}") + (
        "" if args.scale is None else f"-s{args.scale:g}") + ".png"
    for run in map(Path, args.runs):
        if not args.sheets:
            pipe = load_run(run, args.scale)
            pipe.text_encoder.eval()
            pipe.unet.eval()
            scores, concept_images, _ = evaluate(pipe, args.token, cfg)
            if base_accuracy is not None:
                scores["class_drift"] = round(base_accuracy - scores["class_accuracy"], 4)
            print(json.dumps({"run": str(run), "guidance": cfg.guidance, "scale": args.scale, **scores}))
            if not run.is_dir():
                continue  # a base by name: nothing to write a sheet into
            image_grid(concept_images, cfg.samples_per_background).save(run / sheet_name)
        print_counts(str(run), sheet_counts(run / sheet_name))


if __name__ == "__main__":
    main()
