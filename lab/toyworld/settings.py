"""Settings of the toy-base pretraining and of the quality benchmark.

Each field carries its help text (`finetune.config.opt`), so `python -m lab toy-base --help` and
`python -m lab bench-quality --help` describe every flag from the same source as the product's flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finetune.config import opt

# The repository's recipes: the bench trains what `sdft train recipes/...` trains, from whatever folder it runs in.
REPO_RECIPES = Path(__file__).resolve().parents[2] / "recipes"

# Bench method name -> (strategy, recipe file in recipes/, overrides; "{colour}" = the bench's concept colour).
# DreamBooth-LoRA is a recipe, not a strategy; the pivotal variants start the method from a new word of one
# vector trained for 20 steps from the concept's colour (finetune/pivotal.py; lab/FINDINGS.md).
BENCH_METHODS = {
    "textual-inversion": ("textual_inversion", "tiny_textual_inversion.yaml", ()),
    "hypernetwork": ("hypernetwork", "tiny_hypernetwork.yaml", ()),
    "lora": ("lora", "tiny_lora.yaml", ()),
    "dreambooth": ("dreambooth", "tiny_dreambooth.yaml", ()),
    "dreambooth-lora": ("lora", "tiny_dreambooth_lora.yaml", ()),
    "dreambooth-pivotal": ("dreambooth", "tiny_dreambooth_pivotal.yaml", ("pivotal.init_word={colour}",)),
    "dreambooth-lora-pivotal": ("lora", "tiny_dreambooth_lora_pivotal.yaml", ("pivotal.init_word={colour}",)),
}

# Guidance at which the base's own accuracy on its 96 prompts is quoted (`python -m lab score-base`). The quality
# bench samples at its own guidance (QualityBenchConfig.guidance) and measures the base's class accuracy there too.
BASE_SCORE_GUIDANCE = 5.0


@dataclass
class PretrainConfig:
    """Every knob of the toy-base recipe; the defaults build a whole base in one ~30-40 min run on 2 cores.

    Such a base draws 0.90-0.97 of its 1152 scored samples right, depending on the seed and the CPU (bf16
    kernels differ between CPU types, so a seed repeats bit-exactly only on the same CPU type, thread count and
    torch version). The shipped base v5 came from a chain of stages with other values: lab/TOY_BASE.md.
    """

    seed: int = opt(2, "seed of every random choice (renders, initialisation, noise); seed 2 scored 0.967 on an "
                    "Intel Xeon with AMX and 0.928 on an AMD EPYC")
    images: int = opt(12_000, "size of the rendered image pool the VAE and the UNet both learn from")
    vae_steps: int = opt(1_200, "VAE training steps (0 with --init-from: keep its VAE)")
    vae_crop_fraction: float = opt(0.7, "leading share of VAE steps on 32 px crops (~1/5 the cost of a 64 px step)")
    vae_batch: int = opt(32, "VAE batch size (also the decoder fine-tune's)")
    vae_lr: float = opt(2e-3, "VAE learning rate")
    vae_kl_weight: float = opt(1e-6, "weight of the VAE's KL term")
    unet_steps: int = opt(3_000, "text encoder + UNet steps (0: train neither)")
    unet_batch: int = opt(64, "text encoder + UNet batch size")
    unet_lr: float = opt(1e-3, "peak learning rate of the text encoder + UNet (cosine decay to --unet-min-lr)")
    unet_min_lr: float = opt(1e-4, "learning rate at the end of the cosine decay")
    unet_warmup: int = opt(100, "linear warm-up steps")
    snr_gamma: float = opt(5.0, "min-SNR loss weighting gamma (0: off)")
    empty_caption_rate: float = opt(0.1, "share of captions dropped to empty (the unconditional prediction that "
                                    "classifier-free guidance needs)")
    main_caption_rate: float = opt(0.25, "share of captions in the main phrasing 'a {c} {s} on a {b} background', "
                                   "the one that always names colour, shape and background (the rest: any of the "
                                   "16 templates)")
    main_caption_start: float | None = opt(1.0, "caption curriculum: the main phrasing's share at the first UNet "
                                           "step, moving linearly to --main-caption-rate (attributes learned from "
                                           "one grammar first); equal to the rate or none: a constant share")
    max_grad_norm: float = opt(1.0, "gradient clipping norm")
    noise_offset: float = opt(0.1, "offset noise (a per-image, per-channel constant added to the noise): lets the "
                              "UNet move an image's mean colour, which this schedule's non-zero terminal SNR hardly "
                              "allows otherwise (dark backgrounds)")
    threads: int = opt(0, "torch CPU threads (0: torch's default)")
    precision: str = opt("bf16", "bf16: autocast the VAE and UNet/text-encoder steps to bfloat16 (weights, "
                         "optimizer state and latents stay fp32; ~1.25-1.4x faster on CPUs with bf16 units, slower "
                         "without: use fp32 there)", choices=("bf16", "fp32"))
    fused_optimizer: bool = opt(True, "torch's fused AdamW (one kernel for all tensors; about 15 percent off a CPU step)")
    init_from: str | None = opt(None, "continue from a saved toy base: keep its VAE (--decoder-steps may sharpen "
                                "the decoder) and train its text encoder + UNet further")
    sample_posterior: bool = opt(False, "UNet targets drawn from the VAE posterior (default: its mean)")
    device: str = opt("auto", "auto: cuda when available (same recipe; bit-exact only on the same device)")
    ema_decay: float = opt(0.0, "> 0: save an exponential moving average of the text encoder + UNet weights "
                           "instead of the last ones (0.998 ~ the last 500 steps)")
    decoder_steps: int = opt(0, "> 0 (needs --init-from): first fine-tune only the VAE decoder this many steps, "
                             "encoder frozen, so the latent space and every UNet trained on it stay valid")
    decoder_lr: float = opt(1e-3, "decoder fine-tune learning rate")
    decoder_crop_fraction: float = opt(0.0, "leading share of decoder steps on 32 px crops (~1/3 the cost)")
    decoder_edge_weight: float = opt(0.0, "weight of an L1 loss on pixel differences (edges, tips) beside MSE + L1")


@dataclass
class QualityBenchConfig:
    """What `python -m lab bench-quality` runs: every method x prior x seed, scored by the analytic checker."""

    output: str = opt("sdft-output/bench-quality", "results folder; a rerun into it resumes the missing runs")
    base: str = opt("tiny", "base to bench: 'tiny' or a folder from `python -m lab toy-base`")
    methods: list[str] = opt(list(BENCH_METHODS), "methods to train (each a recipe in recipes/)",
                             choices=tuple(BENCH_METHODS))
    priors: list[bool] = opt([False, True], "prior preservation settings to run")
    seeds: list[int] = opt([0, 1, 2], "training seeds per method and prior")
    concept_colour: str = opt("orange", "colour of the novel star the methods learn")
    prior_images: str = opt("renders", "class images: 'renders' of the world (captioned, what the tiny recipes "
                            "train on) or 'generated' by the base from the recipe's class prompts (the toy base "
                            "degrades when trained on its own samples)", choices=("renders", "generated"))
    class_images: int = opt(1000, "class images per prior-on run, rendered or generated")
    instance_images: int = opt(5, "rendered images of the concept to train on")
    samples_per_background: int = opt(25, "concept samples per background (x 4 backgrounds)")
    class_prompts: int = opt(24, "base prompts sampled to measure drift")
    samples_per_class_prompt: int = opt(4, "samples per base prompt")
    sample_steps: int = opt(25, "denoising steps of every sample")
    guidance: float = opt(4.0, "sampling guidance: 4 keeps the concept's colour better than 5 or 7.5 while the "
                          "base's class accuracy on the bench's 96 samples is the same at 4 and 5")
    steps: int | None = opt(None, "override every recipe's train.steps (smoke runs)")
    recipes: str | None = opt(None, "folder of the recipes (default: the repository's recipes/)")
    overrides: list[str] = opt([], "recipe overrides for every run (e.g. train.lr=5e-4): tune a method without "
                               "editing its recipe; one output folder holds runs of one set of overrides only")
    batch: int = opt(96, "images per sampling batch")
