"""Settings of the toy-base pretraining and of the quality benchmark (light: the CLI builds flags from them)."""

from __future__ import annotations

from dataclasses import dataclass, field

# Bench method name -> (strategy, recipe file in recipes/, overrides; "{colour}" = the bench's concept colour).
# DreamBooth-LoRA is a recipe, not a strategy; the pivotal variants start the method from a new word of one
# vector trained for 20 steps from the concept's colour (finetune/pivotal.py; benchmarks/README.md, sessions 10-13).
BENCH_METHODS = {
    "textual-inversion": ("textual_inversion", "tiny_textual_inversion.yaml", ()),
    "hypernetwork": ("hypernetwork", "tiny_hypernetwork.yaml", ()),
    "lora": ("lora", "tiny_lora.yaml", ()),
    "dreambooth": ("dreambooth", "tiny_dreambooth.yaml", ()),
    "dreambooth-lora": ("lora", "tiny_dreambooth_lora.yaml", ()),
    "dreambooth-pivotal": ("dreambooth", "tiny_dreambooth_pivotal.yaml", ("pivotal.init_word={colour}",)),
    "dreambooth-lora-pivotal": ("lora", "tiny_dreambooth_lora_pivotal.yaml", ("pivotal.init_word={colour}",)),
}

# Guidance of `sdft score-base`, the base's own accuracy on its 96 prompts: issue 3's feasibility run scored its
# base at 5, and every base row of finetune/assets/toy_base/README.md since session 10 is at 5. The quality bench
# has its own guidance (QualityBenchConfig.guidance) and measures the base's class accuracy again at that one.
BASE_SCORE_GUIDANCE = 5.0


@dataclass
class PretrainConfig:
    """Every knob of the toy-base recipe; the defaults are the one-run recipe (a whole base in one ~30-40 min run).

    `sdft toy-base --output DIR` builds a base that draws 0.90-0.97 of its 1152 scored samples right, depending
    on the seed and the CPU (bf16 kernels differ between machines, so a seed repeats bit-exactly only on the same
    CPU type, thread count and torch version). The shipped base v5 came from a ~2.7 h chain of stages with other
    values; finetune/assets/toy_base/README.md gives their flags and every one-run result.
    """

    seed: int = 2  # 0.967 on a Xeon with AMX (session 17), 0.928 on an AMD EPYC (session 18); seed 0: 0.904
    images: int = 12_000  # the rendered pool; the VAE and the UNet both learn from it
    vae_steps: int = 1_200
    vae_crop_fraction: float = 0.7  # leading share of VAE steps on 32 px crops (~1/5 the cost of a 64 px step)
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 3_000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    unet_min_lr: float = 1e-4
    unet_warmup: int = 100
    snr_gamma: float = 5.0
    empty_caption_rate: float = 0.1
    # Share of captions in the main phrasing "a {c} {s} on a {b} background" (the rest: any of the 16 templates,
    # of which 3 leave the colour out and 6 the background): every caption of it names all three attributes.
    main_caption_rate: float = 0.25
    # A caption curriculum: when set, the share of main-phrasing captions starts here and moves linearly to
    # main_caption_rate over the UNet steps (1.0 -> 0.25: the attributes are learned from the one grammar that always
    # names them, then the other phrasings are mapped onto them). Equal to main_caption_rate: a constant share.
    main_caption_start: float | None = 1.0
    max_grad_norm: float = 1.0
    # Offset noise (a per-image, per-channel constant added to the noise): lets the UNet move an image's mean
    # colour, which plain epsilon noise at this schedule's non-zero terminal SNR hardly allows (dark backgrounds).
    noise_offset: float = 0.1
    threads: int = 0  # 0: torch's default
    # "bf16": autocast the VAE and UNet/text-encoder steps to bfloat16 (weights, optimizer state and the encoded
    # latents stay fp32). On CPUs with AMX bf16 units (Sapphire Rapids and later) a UNet step is ~1.25x and a 64 px
    # VAE step ~2.4x faster; on an AMD EPYC with AVX512-BF16 but no AMX a UNet step is ~1.4x faster (0.64 s against
    # 0.89 s, benchmarks/pretrain_step_time.py); on CPUs without bf16 instructions slower. The UNet's and VAE's
    # attention then run diffusers' plain processor: torch's CPU flash-attention backward in bf16 is ~10x slower
    # than fp32 for their heads.
    precision: str = "bf16"
    fused_optimizer: bool = True  # torch's fused AdamW (one kernel for all tensors; ~15% off a CPU step)
    # continue from a saved toy base: keep its VAE (decoder_steps may sharpen the decoder), train text encoder + UNet
    # further (unet_steps 0: not at all)
    init_from: str | None = None
    sample_posterior: bool = False  # UNet targets: latents drawn from the VAE posterior (False: its mean)
    device: str = "auto"  # auto: cuda when available (same recipe; bit-exact only on the same device)
    # > 0: save the exponential moving average of the text encoder + UNet weights instead of the last ones
    # (averages out the step-to-step jitter that stage 5's flat loss showed; 0.998 ~ the last 500 steps).
    ema_decay: float = 0.0
    # > 0 (needs init_from): first fine-tune only the VAE decoder this many steps, encoder frozen, so the latent
    # space and every UNet trained on it stay valid. The 800-step VAE rounds off triangle and diamond tips (the
    # checker read 12% of *reconstructed renders* as no shape or a circle); a sharper decoder lifts that ceiling.
    decoder_steps: int = 0  # batch: vae_batch
    decoder_lr: float = 1e-3
    decoder_crop_fraction: float = 0.0  # leading share of decoder steps on 32 px crops (8x8 latents), ~1/3 the cost
    decoder_edge_weight: float = 0.0  # weight of an L1 loss on pixel differences (edges, tips) beside MSE + L1



@dataclass
class QualityBenchConfig:
    """What `sdft bench quality` runs."""

    output: str = "sdft-output/bench-quality"
    base: str = "tiny"  # or a folder from `sdft toy-base`: bench a new base before shipping it
    methods: list[str] = field(default_factory=lambda: list(BENCH_METHODS))
    priors: list[bool] = field(default_factory=lambda: [False, True])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    concept_colour: str = "orange"
    # Prior preservation's class images: "renders" of the world (captioned, none of them a drift probe; what the
    # tiny recipes train on, data_examples/world), or "generated" by the base from the recipe's class prompts
    # (the toy base degrades when trained on its own samples: benchmarks/README.md).
    prior_images: str = "renders"
    class_images: int = 1000  # class images per prior-on run, rendered or generated
    instance_images: int = 5
    samples_per_background: int = 25  # x 4 backgrounds = 100 concept samples per run
    class_prompts: int = 24
    samples_per_class_prompt: int = 4  # 96 class samples per run
    sample_steps: int = 25
    # Guidance 4 since session 14 (5 in sessions 10-13, 7.5 before; a folder keeps the guidance it was started with).
    # Lower guidance keeps the concept's colour: 7.5 pushes orange to red on light backgrounds, 5 still turns it
    # yellow on black; every pivotal recipe gained 4-6 points of subject fidelity at 4 over 5 on bases v4 and v5,
    # while the base's class accuracy on the bench's 96 samples is the same at 4 and 5 (v5: 0.9375). The base's own
    # accuracy (`sdft score-base`) is still quoted at BASE_SCORE_GUIDANCE.
    guidance: float = 4.0
    steps: int | None = None  # override every recipe's train.steps (smoke runs)
    recipes: str = "recipes"
    # Recipe overrides for every run (e.g. train.lr=5e-4 prior.batch_size=16): tune a method without editing
    # its recipe; one output folder holds runs of one set of overrides only.
    overrides: list[str] = field(default_factory=list)
    batch: int = 96
