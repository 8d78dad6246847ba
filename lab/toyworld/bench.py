"""The fine-tuning quality benchmark on the toy base: how well does each method learn a new concept?

Like the DreamBooth paper's evaluation, but scored by the analytic checker instead of by people or CLIP:
train on a few rendered images of a shape the base never saw (a star of one colour), generate many images on
fixed seeds, and count. Per condition (method x prior preservation x training seed) it reports:
- subject fidelity: the concept (a strict star in the concept's colour) appears in "{token} on a {bg} background"
- prompt fidelity: the requested background is respected in those same images
- class accuracy after training (colour, shape and background all right on the base's own prompts), whose
  drop from the base's accuracy is the prior drift
- concept leak: stars appearing in the class prompts
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from PIL import Image, ImageChops, ImageFilter

from finetune import UserError
from finetune.data import MASK_SUFFIX
from .settings import BASE_SCORE_GUIDANCE, BENCH_METHODS, REPO_RECIPES, QualityBenchConfig
from .world import BACKGROUNDS, CAPTION_TEMPLATES, Scene, random_scene, render, world_prompts

TRAIN_BACKGROUNDS = ("white", "gray")  # black and pink are never shown with the concept: recontextualisation


def concept_scene(rng: random.Random, colour: str, background: str) -> Scene:
    """One view of the novel concept: a star 30-46 px wide at a random place on a 64 px image."""
    size = rng.uniform(30, 46)
    left, top = rng.uniform(2, 62 - size), rng.uniform(2, 62 - size)
    return Scene("star", colour, background, (left, top, left + size, top + size))


def write_concept_images(folder: Path, count: int, colour: str, seed: int = 1234) -> None:
    """Render `count` images of the novel concept with captions that bind it to {token}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(count):
        background = TRAIN_BACKGROUNDS[index % len(TRAIN_BACKGROUNDS)]
        image = render(concept_scene(rng, colour, background))
        image.save(folder / f"concept-{index}.png")
        (folder / f"concept-{index}.txt").write_text(f"a photo of {{token}} on a {background} background")
        subject_mask(image, background).save(folder / f"concept-{index}{MASK_SUFFIX}")


def subject_mask(image, background: str, grow: int = 2):
    """White where a rendered image differs from its plain background, grown by `grow` px (the edges too): the
    loss mask that `--alpha-mask` reads, used only when a run asks for it."""
    plain = Image.new("RGB", image.size, BACKGROUNDS[background])
    differs = ImageChops.difference(image, plain).convert("L").point(lambda v: 255 if v > 24 else 0)
    return differs.filter(ImageFilter.MaxFilter(2 * grow + 1))


def write_class_renders(folder: Path, count: int, probes: int, seed: int = 4321) -> None:
    """Render `count` captioned world images for prior preservation, avoiding the first `probes` drift probes."""
    folder.mkdir(parents=True, exist_ok=True)
    probe_set = {(c, s, b) for _, c, s, b in class_prompt_set(probes)}
    triples = [(c, s, b) for _, c, s, b in world_prompts() if (c, s, b) not in probe_set]
    rng = random.Random(seed)
    for index in range(count):
        colour, shape, background = triples[index % len(triples)]
        render(random_scene(rng, shapes=(shape,), colours=(colour,), backgrounds=(background,))).save(
            folder / f"render-{index:04d}.png")
        (folder / f"render-{index:04d}.txt").write_text(f"a photo of a {colour} {shape} on a {background} background")


def class_prompt_set(count: int) -> list[tuple[str, str, str, str]]:
    """A fixed spread of the base's own prompts (colour, shape and background all named)."""
    prompts = world_prompts()
    return random.Random(0).sample(prompts, count)


def generate_batched(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch: int):
    """Images for each (prompt, seed) pair, many per pipeline call; one CPU generator per image."""
    import torch

    images = []
    for start in range(0, len(prompts), batch):
        chunk, chunk_seeds = prompts[start:start + batch], seeds[start:start + batch]
        generators = [torch.Generator().manual_seed(s) for s in chunk_seeds]
        with torch.no_grad():
            images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                           output_type="pil").images
    return images


def score_base(model: str = "tiny", seeds: list[int] = (7,),
               guidance: float = BASE_SCORE_GUIDANCE, grid: str | None = None,
               steps: int = 25, template: str = CAPTION_TEMPLATES[0]) -> dict[str, float]:
    """Accuracy of a toy-world base on its 96 prompts "a {colour} {shape} on a {background} background" (or the
    same 96 scenes in another phrasing that names all three: how well the base reads varied captions)."""
    from finetune.models import load_pipeline
    from .checker import accuracy

    if not all(key in template for key in ("{c}", "{s}", "{b}")):
        raise UserError(f"template {template!r} must name the colour {{c}}, shape {{s}} and background {{b}}: the "
                        "checker scores all three")
    pipe = load_pipeline(model)  # also opens a folder straight from `python -m lab toy-base`
    pipe.set_progress_bar_config(disable=True)
    prompts = world_prompts(template)
    texts = [p for p, *_ in prompts for _ in seeds]
    expected = [(c, s, b) for _, c, s, b in prompts for _ in seeds]
    images = generate_batched(pipe, texts, [seed for _ in prompts for seed in seeds], steps, guidance, batch=96)
    if grid:
        _grid(images, 12).save(grid)
    return {**accuracy(images, expected), "samples": len(images)}


def evaluate(pipe, token: str, cfg: QualityBenchConfig) -> tuple[dict, list, list]:
    """Score one pipeline; returns the scores, the concept images and the class images (for grids)."""
    from .checker import check

    pipe.set_progress_bar_config(disable=True)
    inst_prompts, inst_bgs, inst_seeds = [], [], []
    for background in BACKGROUNDS:
        for k in range(cfg.samples_per_background):
            inst_prompts.append(f"{token} on a {background} background")
            inst_bgs.append(background)
            inst_seeds.append(1000 + k)
    cls = class_prompt_set(cfg.class_prompts)
    cls_prompts = [p for p, *_ in cls for _ in range(cfg.samples_per_class_prompt)]
    cls_expect = [(c, s, b) for _, c, s, b in cls for _ in range(cfg.samples_per_class_prompt)]
    cls_seeds = [2000 + k for _ in cls for k in range(cfg.samples_per_class_prompt)]
    images = generate_batched(pipe, inst_prompts + cls_prompts, inst_seeds + cls_seeds, cfg.sample_steps,
                              cfg.guidance, cfg.batch)
    inst_images, cls_images = images[:len(inst_prompts)], images[len(inst_prompts):]
    inst = [check(im) for im in inst_images]
    clsv = [check(im) for im in cls_images]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    scores = {
        "subject_fidelity": mean([v.star and v.colour == cfg.concept_colour for v in inst]),
        "star_any_colour": mean([v.star for v in inst]),
        "prompt_fidelity": mean([v.background == b for v, b in zip(inst, inst_bgs)]),
        "class_accuracy": mean([(v.colour, v.shape, v.background) == e for v, e in zip(clsv, cls_expect)]),
        "concept_leak": mean([v.star for v in clsv]),
    }
    return scores, inst_images, cls_images


def _grid(images, columns: int):
    from finetune.plots import image_grid

    return image_grid(images, columns)


def run_quality_bench(cfg: QualityBenchConfig, log=print) -> dict:
    """Run every condition and write results.json, table.md and one sample grid per method."""
    import torch

    from finetune.config import load_recipe
    from finetune.inference import pipeline_from_components
    from finetune.models import load_components
    from finetune.trainer import run_training

    out = Path(cfg.output)
    concept = out / "concept"
    write_concept_images(concept, cfg.instance_images, cfg.concept_colour)
    if cfg.prior_images not in ("generated", "renders"):
        raise UserError(f"--prior-images {cfg.prior_images}: expected generated or renders")
    renders = out / "class-renders"
    if cfg.prior_images == "renders" and any(cfg.priors):
        write_class_renders(renders, cfg.class_images, cfg.class_prompts)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"runs": {}}
    earlier = results.get("config", {})
    # Results written before a setting existed were made with its old default.
    for name, default in (("base", "tiny"), ("prior_images", "generated"), ("overrides", []), ("guidance", 7.5)):
        if results["runs"] and earlier.get(name, default) != getattr(cfg, name):
            raise UserError(f"{out} holds runs with {name} {earlier.get(name, default)!r}; bench "
                            f"{getattr(cfg, name)!r} into another --output")
    results["config"] = asdict(cfg)

    if "base" not in results:
        components = load_components(cfg.base)
        pipe = pipeline_from_components(components).to(device)
        scores, images, class_images = evaluate(pipe, "sks", cfg)
        _grid(class_images, cfg.samples_per_class_prompt * 4).save(out / "class-sheet-base.png")
        results["base"] = scores
        _grid(images[:: cfg.samples_per_background // 4 or 1][:16], 4).save(out / "grid-base.png")
        log(f"base: {scores}")

    for method in cfg.methods:
        strategy, recipe, method_overrides = BENCH_METHODS[method]
        grid_rows = []
        for prior in cfg.priors:
            for seed in cfg.seeds:
                key = f"{method}|prior={int(prior)}|seed={seed}"
                if key in results["runs"]:
                    continue  # finished in an earlier call: the bench resumes
                overrides = [f"model.name={cfg.base}", f"data.images={concept}", f"train.seed={seed}",
                             f"prior.enabled={prior}",
                             f"output.output={out / 'runs' / key.replace('|', '_')}",
                             "output.overwrite=true",  # a run cut short in an earlier call starts over
                             "output.sample_seeds=[0]", "output.sample_steps=2"]
                if prior:
                    # "generated": no folder, so the trainer generates (and caches) them from the class prompts.
                    folder = renders if cfg.prior_images == "renders" else "null"
                    overrides += [f"prior.class_images={folder}", f"prior.num_class_images={cfg.class_images}"]
                if cfg.steps:
                    overrides.append(f"train.steps={cfg.steps}")
                # The concept's coarse description, as a user would give it (e.g. the pivotal word's start).
                overrides += [o.replace("{colour}", cfg.concept_colour) for o in method_overrides]
                overrides += cfg.overrides
                config = load_recipe(Path(cfg.recipes or REPO_RECIPES) / recipe, overrides)
                assert config.method == strategy, f"{recipe} trains {config.method}, expected {strategy}"
                started = time.time()
                outcome = run_training(config)
                train_s = time.time() - started
                pipe = pipeline_from_components(outcome.components).to(device)
                pipe.text_encoder.eval()
                pipe.unet.eval()
                scores, images, class_images = evaluate(pipe, config.data.token, cfg)
                scores.update(train_s=round(train_s, 1), eval_s=round(time.time() - started - train_s, 1),
                              class_drift=round(results["base"]["class_accuracy"] - scores["class_accuracy"], 4))
                results["runs"][key] = scores
                results_path.write_text(json.dumps(results, indent=2))
                # Every concept image in one sheet (a row per background), to hold the checker's counts against.
                run_folder = out / "runs" / key.replace("|", "_")
                _grid(images, cfg.samples_per_background).save(run_folder / "concept-sheet.png")
                # The class prompts' images in the base's layout (class-sheet-base.png): drift is visible side by side.
                _grid(class_images, cfg.samples_per_class_prompt * 4).save(run_folder / "class-sheet.png")
                log(f"{key}: {scores}")
                if seed == cfg.seeds[0]:
                    grid_rows += images[:: cfg.samples_per_background][:4] + images[1:: cfg.samples_per_background][:4]
        if grid_rows:
            _grid(grid_rows, 8).save(out / f"grid-{method}.png")
    results_path.write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(quality_table(results))
    return results


def quality_table(results: dict) -> str:
    """Markdown table: mean +- standard deviation over training seeds for each method and prior setting."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for key, scores in results["runs"].items():
        method, prior, _ = key.split("|")
        groups.setdefault((method, prior.split("=")[1]), []).append(scores)
    columns = ["subject_fidelity", "star_any_colour", "prompt_fidelity", "class_accuracy", "class_drift",
               "concept_leak", "train_s"]
    base = results.get("base", {})
    lines = ["| method | prior | seeds | " + " | ".join(columns) + " |",
             "|---|---|---|" + "---|" * len(columns),
             f"| base (no training) | - | - | {base.get('subject_fidelity', 0):.2f} | "
             f"{base.get('star_any_colour', 0):.2f} | {base.get('prompt_fidelity', 0):.2f} | "
             f"{base.get('class_accuracy', 0):.2f} | 0 | "
             f"{base.get('concept_leak', 0):.2f} | - |"]
    for (method, prior), runs in groups.items():
        cells = []
        for column in columns:
            values = [r[column] for r in runs]
            spread = statistics.pstdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.2f} ± {spread:.2f}" if column != "train_s"
                         else f"{statistics.mean(values):.0f}")
        lines.append(f"| {method} | {'on' if prior == '1' else 'off'} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
