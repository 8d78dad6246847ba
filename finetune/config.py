"""Typed configuration: the one source of CLI flags, recipe keys, defaults and help texts.

A run is a `RunConfig` made of sections (model, data, train, ...). Recipe YAML files use the same
sections as mappings; `key=value` overrides use dotted names (`train.lr=1e-4`); CLI flags are the
field names with dashes (`--lr`), unique across sections. Method-specific sections (`lora`, ...) exist
on every config but only the chosen method's flags are offered on its subcommand.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import UserError


OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor", "lion", "adamw_schedulefree")


def opt(default, help: str, flag: str | None = None, choices: tuple | None = None, cli: bool = True, **kw):
    """A config field with its help text, an optional CLI flag name and allowed values (cli=False: recipes only)."""
    meta = {"help": help, "flag": flag, "choices": choices, "cli": cli}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ModelConfig:
    name: str = opt("tiny", "base model: 'tiny' (built-in, offline), a hub id, a local diffusers folder, "
                    "or a single-file .safetensors checkpoint", flag="model")
    single_file_config: str | None = opt(None, "diffusers folder or hub id with the configs for a "
                                         "single-file --model", flag="model-config")
    family: str | None = opt(None, "the base's family (default: detected from a local folder or file; name it "
                             "for an SDXL hub id)", choices=("sd", "sdxl"))
    vae: str | None = opt(None, "use this VAE instead of the base's (a diffusers VAE folder, .safetensors file or "
                          "hub id, e.g. an fp16-safe SDXL VAE)")
    prediction_type: str | None = opt(None, "override the scheduler's prediction type",
                                      choices=("epsilon", "v_prediction"))
    zero_terminal_snr: bool = opt(False, "rescale the noise schedule to zero terminal SNR (Lin et al. 2023; "
                                  "use with v-prediction)")


@dataclass
class DatasetConfig:
    """One entry of data.datasets (recipes only); unset keys take the data section's value."""

    images: str | None = opt(None, "folder of this data set's images (as --images)")
    token: str | None = opt(None, "its trigger word (default: data.token)")
    class_word: str | None = opt(None, "its class (default: data.class_word); prior preservation generates class "
                                 "images for each class named")
    prompt: str | None = opt(None, "its prompt template (default: data.prompt)")
    repeats: int = opt(1, "times each of its images is drawn per epoch (kohya's N_ folder prefix): its share of the "
                       "samples is repeats x images")
    resolution: int | None = opt(None, "its training resolution (default: data.resolution)")
    caption_dropout: float | None = opt(None, "default: data.caption_dropout")
    shuffle_captions: bool | None = opt(None, "default: data.shuffle_captions")
    keep_tokens: int | None = opt(None, "default: data.keep_tokens")


@dataclass
class DataConfig:
    images: str | None = opt(None, "folder of instance images (captions: img.txt beside img.png, or metadata.jsonl), "
                             "a `datasets` image data set saved with save_to_disk (caption column text/caption/prompt), "
                             "or a folder of kohya-style sub-folders 'N_token class' (N repeats each)")
    datasets: list[DatasetConfig] = opt([], "several data sets in one run (recipes only): a list of {images, token, "
                                        "class_word, prompt, repeats, resolution, caption options}", cli=False)
    token: str = opt("sks", "the rare word the concept is bound to")
    class_word: str = opt("", "the concept's class, e.g. dog (used in prompts and prior preservation)")
    prompt: str = opt("a photo of {token} {class}", "instance prompt template; caption files override it")
    resolution: int | None = opt(None, "training resolution in pixels (default: the base's native size)")
    center_crop: bool = opt(True, "center-crop to a square (else random crop)")
    buckets: bool = opt(False, "aspect-ratio bucketing: train each image near its own shape (sizes in steps of "
                        "--bucket-step, area <= resolution^2, ratio up to 2:1) instead of a square crop")
    bucket_step: int = opt(64, "bucket sides are multiples of this (64 for SD; 16 for the tiny base)")
    bucket_no_upscale: bool = opt(False, "with --buckets: images smaller than the target area keep their size")
    random_flip: bool = opt(False, "randomly flip images horizontally")
    cache_latents: bool = opt(True, "encode each image with the VAE once, not every step")
    vae_posterior: str = opt("sample", "training latents: a fresh sample of each image's VAE posterior every step (as "
                             "diffusers' and kohya's scripts do) or its mean (how the toy-world bases were "
                             "pretrained; on them it learns less and drifts less)",
                             choices=("sample", "mean"))
    latent_cache_dir: str | None = opt(None, "also keep the cached latents on disk here, reused by later runs "
                                       "(keyed by image pixels, resolution, crop/flip, dtype and VAE weights)")
    alpha_mask: bool = opt(False, "use a loss mask per image: a mask file beside it (NAME-masklabel.png, white = "
                           "learn) or else its alpha channel; masked-out areas are not learned (images with "
                           "neither count as all learned)")
    unmasked_weight: float = opt(0.0, "with --alpha-mask: loss weight of the masked-out areas (0 = not learned, 1 = "
                                 "as if unmasked)")
    caption_dropout: float = opt(0.0, "probability of training a sample with an empty caption (helps guidance)")
    shuffle_captions: bool = opt(False, "shuffle the comma-separated tags of each caption every time")
    keep_tokens: int = opt(1, "with --shuffle-captions: leading tags that stay in place (e.g. the trigger word)")
    validation_images: str | None = opt(None, "folder of held-out images (captions as for --images): a validation "
                                        "loss at fixed noise and timesteps, logged and drawn beside the training loss")
    validation_share: float = opt(0.0, "hold out this share of --images for the validation loss instead (every "
                                  "k-th image; 0 = none)")


@dataclass
class TrainConfig:
    steps: int = opt(400, "optimizer steps to train")
    batch_size: int = opt(1, "images per step per process")
    lr: float = opt(1e-4, "learning rate")
    lr_scheduler: str = opt("constant", "learning-rate schedule",
                            choices=("constant", "constant_with_warmup", "linear", "cosine",
                                     "cosine_with_restarts", "polynomial"))
    lr_warmup_steps: int = opt(0, "linear warm-up steps")
    grad_accum: int = opt(1, "gradient accumulation steps")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = off)")
    weight_decay: float = opt(1e-2, "AdamW weight decay")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon")
    optimizer: str = opt("adamw", "optimizer: adamw; adamw8bit (bitsandbytes, CUDA); prodigy (finds its own step "
                         "size: use --lr 1); adafactor (memory-light, for full fine-tunes); lion (betas: "
                         "--adam-beta1 and 0.99); adamw_schedulefree (constant --lr-scheduler). The optional ones "
                         "install as extras: pip install \"sdft[optimizers]\"", choices=OPTIMIZERS)
    prodigy_d_coef: float = opt(1.0, "prodigy: multiplier of the estimated step size (below 1: more careful)")
    prodigy_bias_correction: bool = opt(False, "prodigy: Adam's bias correction (often on in LoRA guides)")
    prodigy_safeguard_warmup: bool = opt(False, "prodigy: keep the step-size estimate stable during lr warm-up "
                                         "(advised with --lr-warmup-steps)")
    adafactor_relative_step: bool = opt(False, "adafactor: its own time-dependent step size instead of --lr")
    mixed_precision: str = opt("no", "mixed precision (fp16/bf16 need a GPU, bf16 also runs on CPU)",
                               choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = opt(False, "trade compute for memory in the UNet")
    fused_optimizer: str = opt("auto", "AdamW's fused kernel (one pass over all weights): auto = on CUDA, and on a CPU "
                               "when 10M+ values train (DreamBooth, textual inversion's embedding table: 5x faster "
                               "updates there); smaller sets keep the per-tensor loop", choices=("auto", "on", "off"))
    fused_backward_pass: str = opt("auto", "update each weight inside the backward pass as soon as its gradient is "
                                   "complete, so the whole model's gradients never exist together (full fine-tunes: "
                                   "-3.4 GB at SD1.5, -10 GB at SDXL); clipping then applies per weight tensor. auto = "
                                   "on for full fine-tunes (DreamBooth) with adamw/adafactor/lion, one process, no "
                                   "fp16, no gradient accumulation, no --compile-unet", choices=("auto", "on", "off"))
    offload_frozen: str = opt("auto", "keep the VAE (once every latent is cached) and text encoders that do not train "
                              "in CPU memory during the steps, back on the device for new prompts, sample grids "
                              "and exports (SDXL: ~2 GB of GPU memory); auto = on a GPU",
                              choices=("auto", "on", "off"))
    attention: str = opt("sdpa", "the UNet's attention kernel: sdpa (PyTorch's fused attention) or xformers (pip "
                         "install xformers; CUDA)", choices=("sdpa", "xformers"))
    channels_last: bool = opt(False, "keep the UNet's weights and activations in channels-last memory layout (faster "
                              "convolutions on tensor-core GPUs)")
    compile_unet: bool = opt(False, "torch.compile the UNet: minutes of compiling before the first step, faster "
                             "steps after (PyTorch 2; on GPUs)")
    seed: int = opt(0, "seed for data order, noise and timesteps")
    loss: str = opt("l2", "loss between prediction and target", choices=("l2", "l1", "huber"))
    huber_delta: float = opt(0.1, "Huber loss threshold (with --loss huber)")
    snr_gamma: float | None = opt(None, "min-SNR loss weighting gamma (5 is common; unset = off)")
    noise_offset: float = opt(0.0, "noise offset (helps very dark/bright images)")
    input_perturbation: float = opt(0.0, "extra noise on the noised input only (Ning et al. 2023; 0.1 is common)")
    ema_decay: float = opt(0.0, "keep an exponential moving average of the trained weights with this decay "
                           "(e.g. 0.999; 0 = off); final samples and exports use the average")
    ema_on_cpu: bool = opt(False, "keep the average in CPU memory (saves GPU memory, costs a copy per step)")


@dataclass
class PriorConfig:
    enabled: bool = opt(False, "prior preservation: also train on generated images of the class", flag="prior")
    class_images: str | None = opt(None, "folder of class images (missing ones are generated into it); "
                                   "default: a cache folder keyed by base, prompt, resolution and seed")
    num_class_images: int = opt(100, "class images to use (generated when fewer exist)")
    class_prompt: str = opt("a photo of {class}", "prompt of the class images ({class} = --class-word)")
    class_prompts: list[str] = opt([], "several class prompts, cycled over the generated class images (each image "
                                   "keeps its prompt as a .txt caption, kohya-style); default: class_prompt alone")
    weight: float = opt(1.0, "weight of the prior loss", flag="prior-weight")
    batch_size: int | None = opt(None, "class images per step and process (default: train.batch_size); more of "
                                 "them anchor the base's world harder at each instance step", flag="prior-batch-size")
    caption_dropout: float = opt(0.0, "probability of training a class image with an empty caption: keeps the "
                                 "unconditional prediction (half of every guided step) on the class, not the "
                                 "subject", flag="prior-caption-dropout")
    generation_steps: int = opt(25, "denoising steps per generated class image")
    generation_batch: int = opt(4, "class images generated per pipeline call")


@dataclass
class OutputConfig:
    output: str = opt("sdft-output", "run folder")
    checkpoint_every: int = opt(0, "save a resumable checkpoint every N steps (0 = none; Ctrl-C still saves one)")
    keep_checkpoints: int = opt(2, "keep the last K checkpoints")
    resume: str | None = opt(None, "resume from 'latest' or a checkpoint folder (refused when the checkpoint's run "
                             "trained other settings)")
    overwrite: bool = opt(False, "clear an older run in the output folder first (without it, a folder that holds a "
                          "run is refused)")
    formats: list[str] = opt([], "export formats (default: all of the method's formats)")
    sample_every: int = opt(0, "write a sample grid every N steps (0 = only at the end)")
    sample_prompts: list[str] = opt([], "prompts for sample grids ({token} and {class} are filled in; default: "
                                   "the instance prompt)")
    sample_seeds: list[int] = opt([0, 1, 2, 3], "seeds of the sample images (an empty list: no samples)")
    sample_steps: int = opt(25, "denoising steps for samples")
    guidance: float = opt(5.0, "classifier-free guidance scale for samples")
    log_every: int = opt(1, "log loss/lr to the trackers every N steps")
    report_to: str = opt("tensorboard", "where losses and the lr are logged: tensorboard (<output>/logs), wandb "
                         "(pip install \"sdft[wandb]\"; offline into <output>/wandb unless WANDB_API_KEY or "
                         "WANDB_MODE is set) or none", choices=("tensorboard", "wandb", "none"))
    validation_every: int = opt(50, "compute the validation loss every N steps (and before the first and after "
                                "the last), when there is a validation set")
    validation_timesteps: int = opt(4, "timesteps the validation loss averages, spread evenly over the schedule")


@dataclass
class LoraConfig:
    rank: int = opt(4, "LoRA rank of the UNet")
    alpha: float | None = opt(None, "LoRA alpha of the UNet (default: rank, i.e. scale 1)")
    algo: str = opt("lora", "adapter type: lora; dora (LoRA with each weight row's length learned apart, Liu et al. "
                    "2024); loha (Hadamard product of two low-rank pairs); lokr (Kronecker product of two factors). "
                    "dora, loha and lokr export in LyCORIS's layout (A1111, ComfyUI, Forge)",
                    choices=("lora", "dora", "loha", "lokr"))
    lokr_factor: int = opt(-1, "lokr: split each weight dimension into this factor and the rest (-1: as square as "
                           "possible)")
    dropout: float = opt(0.0, "LoRA dropout (lora and dora)")
    targets: str = opt("attn", "UNet modules: 'attn' (to_q/k/v/out, diffusers' examples), 'kohya' (every "
                       "Linear and 1x1 conv in the transformer blocks), 'all' (kohya + resnet convs), "
                       "or a comma list of module-name suffixes")
    train_text_encoder: bool = opt(False, "also put LoRA on the text encoder")
    text_encoder_lr: float | None = opt(None, "text-encoder LoRA lr (default: --lr)")
    text_encoder_rank: int | None = opt(None, "text-encoder LoRA rank (default: --rank)")
    text_encoder_alpha: float | None = opt(None, "text-encoder LoRA alpha (default: its rank)")


@dataclass
class TextualInversionConfig:
    init_word: str = opt("", "word (or phrase) whose embedding initialises the new token")
    vectors: int = opt(1, "embedding vectors per token")
    property: str = opt("object", "prompt templates to train with", choices=("object", "style"))
    reuse_token: bool = opt(False, "allow a token the tokenizer already has (its embedding is overwritten)")


@dataclass
class HypernetworkConfig:
    layer_structure: list[float] = opt([1.0, 2.0, 1.0], "widths of the K/V networks relative to the context "
                                       "dimension; starts and ends with 1")
    activation: str = opt("linear", "activation between layers", choices=(
        "linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "softsign", "mish"))
    layer_norm: bool = opt(False, "LayerNorm after each Linear")
    activate_output: bool = opt(False, "apply the activation after the last layer too")
    weight_init: str = opt("Normal", "weight initialisation", choices=(
        "Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"))
    dropout: list[float] = opt([], "dropout per layer (same length as layer_structure, 0 at both ends); "
                               "empty = no dropout")
    last_layer_dropout: bool = opt(False, "A1111's last_layer_dropout flag")
    dims: list[int] = opt([], "context dimensions to build networks for (default: every attention "
                          "context width of the base)")
    strength: float = opt(1.0, "multiplier applied while training and stored as the default")


@dataclass
class DreamBoothConfig:
    train_text_encoder: bool = opt(False, "also fine-tune the text encoder")
    text_encoder_lr: float | None = opt(None, "text-encoder lr (default: --lr)")
    train_token_embeddings: bool = opt(True, "with --train-text-encoder: also train the word-embedding table (off: "
                                       "only the encoder's layers train, so a pivotal word keeps the vector its "
                                       "first phase gave it)")


@dataclass
class PivotalConfig:
    steps: int = opt(0, "pivotal tuning: first train only the new word's embedding for this many steps (as textual "
                     "inversion does), then the method trains on top of that word (0 = off; data.token must be a "
                     "word the tokenizer does not know, e.g. '<sks>')", flag="pivotal-steps")
    lr: float = opt(5e-3, "learning rate of the embedding phase", flag="pivotal-lr")
    vectors: int = opt(2, "embedding vectors of the new word", flag="pivotal-vectors")
    init_word: str = opt("", "word (or phrase) the embedding starts from (default: data.class_word)",
                         flag="pivotal-init-word")
    norm: float | None = opt(None, "rescale every learned vector to this length before the method's phase (unset: "
                             "keep them); textual inversion leaves them far longer than the base's own words, and an "
                             "over-long word drowns the rest of the prompt (the toy base's own words: ~0.3)",
                             flag="pivotal-norm")


# Which section each method owns; a method's subcommand offers the shared sections plus its own (and extras).
METHOD_SECTIONS: dict[str, str] = {
    "lora": "lora", "textual_inversion": "textual_inversion", "hypernetwork": "hypernetwork",
    "dreambooth": "dreambooth"}
# Sections some methods share besides their own: pivotal tuning starts LoRA and DreamBooth from a learned word.
METHOD_EXTRA_SECTIONS: dict[str, tuple[str, ...]] = {"lora": ("pivotal",), "dreambooth": ("pivotal",)}
SHARED_SECTIONS = ("model", "data", "train", "prior", "output")

# Per-method defaults that differ from the dataclass defaults (dotted keys).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"train.lr": 1e-4},
    "textual_inversion": {"train.lr": 5e-4, "train.weight_decay": 0.0},
    "hypernetwork": {"train.lr": 1e-5, "train.weight_decay": 0.0},
    # The DreamBooth paper's and diffusers' choice for SD: lr 5e-6 with prior preservation on.
    "dreambooth": {"train.lr": 5e-6, "prior.enabled": True},
}


@dataclass
class RunConfig:
    method: str = "lora"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    textual_inversion: TextualInversionConfig = field(default_factory=TextualInversionConfig)
    hypernetwork: HypernetworkConfig = field(default_factory=HypernetworkConfig)
    dreambooth: DreamBoothConfig = field(default_factory=DreamBoothConfig)
    pivotal: PivotalConfig = field(default_factory=PivotalConfig)

    @classmethod
    def for_method(cls, method: str) -> "RunConfig":
        """A config with the method's own defaults applied."""
        if method not in METHOD_SECTIONS:
            raise UserError(f"unknown method '{method}'{_suggest(method, METHOD_SECTIONS)}")
        config = cls(method=method)
        for key, value in METHOD_DEFAULTS.get(method, {}).items():
            config.set(key, value)
        return config

    def sections(self) -> list[str]:
        """The sections that matter for this config's method."""
        return [*SHARED_SECTIONS, METHOD_SECTIONS[self.method], *METHOD_EXTRA_SECTIONS.get(self.method, ())]

    def set(self, dotted: str, value: Any) -> None:
        """Set `section.key` to `value` (strings are parsed to the field's type)."""
        section, _, key = dotted.partition(".")
        if not key:
            raise UserError(f"'{dotted}': use section.key, e.g. train.lr{_suggest(dotted, self.dotted_keys())}")
        obj = getattr(self, section, None)
        if section not in self.sections() or obj is None:
            raise UserError(f"unknown section '{section}'{_suggest(section, self.sections())}")
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if key not in fields:
            raise UserError(f"unknown key '{dotted}'{_suggest(dotted, self.dotted_keys())}")
        setattr(obj, key, coerce(value, fields[key], dotted))

    def dotted_keys(self) -> list[str]:
        return [f"{s}.{f.name}" for s in self.sections() for f in dataclasses.fields(getattr(self, s))]

    def to_dict(self) -> dict:
        """The resolved config as plain data (only the sections this method uses)."""
        out: dict[str, Any] = {"method": self.method}
        for section in self.sections():
            out[section] = dataclasses.asdict(getattr(self, section))
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        """Build from recipe data: {method, section: {key: value}}; unknown keys are errors."""
        if data is not None and not isinstance(data, dict):
            raise UserError(f"a recipe is a mapping of sections (method: lora, train: {{steps: ...}}), not a "
                            f"{type(data).__name__}")
        data = dict(data or {})
        method = data.pop("method", None)
        if not method:
            raise UserError("recipe has no 'method:' (one of " + ", ".join(METHOD_SECTIONS) + ")")
        config = cls.for_method(str(method))
        for section, values in data.items():
            if not isinstance(values, dict):
                raise UserError(f"recipe key '{section}' must be a section mapping{_suggest(section, config.sections())}")
            for key, value in values.items():
                config.set(f"{section}.{key}", value)
        return config

    def validate(self) -> None:
        """Check values that a type alone cannot; raise UserError naming the key."""
        for section in self.sections():
            obj = getattr(self, section)
            for f in dataclasses.fields(obj):
                choices = f.metadata.get("choices")
                value = getattr(obj, f.name)
                if choices and value is not None and value not in choices:
                    raise UserError(f"{section}.{f.name}={value!r}: choose one of {', '.join(choices)}")
        if self.train.steps < 1 or self.train.batch_size < 1 or self.train.grad_accum < 1:
            raise UserError("train.steps, train.batch_size and train.grad_accum must be >= 1")
        if self.prior.batch_size is not None and self.prior.batch_size < 1:
            raise UserError(f"prior.batch_size must be >= 1, got {self.prior.batch_size}")
        for name, share in (("data.caption_dropout", self.data.caption_dropout),
                            ("prior.caption_dropout", self.prior.caption_dropout),
                            ("data.unmasked_weight", self.data.unmasked_weight)):
            if not 0.0 <= share <= 1.0:
                raise UserError(f"{name} must be between 0 and 1, got {share}")
        if self.train.lr <= 0:
            raise UserError("train.lr must be > 0")
        if self.data.resolution is not None and (self.data.resolution < 8 or self.data.resolution % 8):
            raise UserError(f"data.resolution={self.data.resolution}: use a multiple of 8 (e.g. 512; the VAE "
                            "works on 8x8 blocks)")
        if self.output.sample_steps < 1 or self.output.guidance < 0 or any(s < 0 for s in self.output.sample_seeds):
            raise UserError("output.sample_steps must be >= 1, output.guidance >= 0 and sample seeds >= 0")
        if self.train.optimizer == "adamw_schedulefree" and (self.train.lr_scheduler != "constant"
                                                             or self.train.ema_decay):
            raise UserError("train.optimizer=adamw_schedulefree replaces the lr schedule and the weight average: use "
                            "--lr-scheduler constant (its --lr-warmup-steps still apply) and no --ema-decay")
        self._validate_datasets()
        if not 0.0 <= self.data.validation_share <= 0.5:
            raise UserError(f"data.validation_share must be between 0 and 0.5, got {self.data.validation_share}")
        if self.data.validation_share and self.data.validation_images:
            raise UserError("pass data.validation_images or data.validation_share, not both")
        if self.output.validation_every < 1 or self.output.validation_timesteps < 1:
            raise UserError("output.validation_every and output.validation_timesteps must be >= 1")
        if self.output.checkpoint_every < 0 or self.output.keep_checkpoints < 1 or self.output.sample_every < 0:
            raise UserError("output.checkpoint_every and output.sample_every must be >= 0, "
                            "output.keep_checkpoints >= 1")
        if self.method == "lora":
            lora = self.lora
            if lora.rank < 1 or (lora.text_encoder_rank is not None and lora.text_encoder_rank < 1):
                raise UserError(f"lora.rank and lora.text_encoder_rank must be >= 1, got {lora.rank} and "
                                f"{lora.text_encoder_rank}")
            if any(a is not None and a <= 0 for a in (lora.alpha, lora.text_encoder_alpha)):
                raise UserError("lora.alpha and lora.text_encoder_alpha must be > 0 (or unset: the rank)")
            if not 0.0 <= lora.dropout < 1.0:
                raise UserError(f"lora.dropout must be in [0, 1), got {lora.dropout}")
            if lora.dropout and lora.algo in ("loha", "lokr"):
                raise UserError(f"lora.dropout works with lora and dora; lora.algo={lora.algo} trains without it")
            if lora.lokr_factor == 0 or lora.lokr_factor < -1:
                raise UserError(f"lora.lokr_factor must be -1 or >= 1, got {lora.lokr_factor}")
        if self.train.attention == "xformers" and self.method == "hypernetwork":
            raise UserError("train.attention=xformers: hypernetworks run through their own attention processor; "
                            "use sdpa")
        if self.data.buckets and (self.data.bucket_step < 8 or self.data.bucket_step % 8):
            raise UserError("data.bucket_step must be a multiple of 8 (the VAE's downsampling), e.g. 64")
        if "pivotal" in self.sections() and self.pivotal.steps:
            if self.pivotal.steps < 0 or self.pivotal.vectors < 1 or self.pivotal.lr <= 0:
                raise UserError("pivotal.steps must be >= 0, pivotal.vectors >= 1 and pivotal.lr > 0")
            if self.pivotal.norm is not None and self.pivotal.norm <= 0:
                raise UserError(f"pivotal.norm must be > 0 (or unset), got {self.pivotal.norm}")

    def _validate_datasets(self) -> None:
        if self.data.datasets and self.data.images:
            raise UserError("pass data.images or data.datasets, not both")
        for index, entry in enumerate(self.data.datasets):
            name = f"data.datasets[{index}]"
            if entry.repeats < 1:
                raise UserError(f"{name}.repeats must be >= 1, got {entry.repeats}")
            if entry.resolution is not None and (entry.resolution < 8 or entry.resolution % 8):
                raise UserError(f"{name}.resolution={entry.resolution}: use a multiple of 8 (e.g. 512)")
            if entry.caption_dropout is not None and not 0.0 <= entry.caption_dropout <= 1.0:
                raise UserError(f"{name}.caption_dropout must be between 0 and 1, got {entry.caption_dropout}")


def load_recipe(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a recipe YAML and apply `section.key=value` overrides."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"recipe {path} is not valid YAML: {exc}") from exc
    config = RunConfig.from_dict(data)
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"override '{item}' must look like section.key=value")
        config.set(key.strip(), yaml.safe_load(value) if value.strip() else "")
    return config


def saved_config_dict(config: RunConfig) -> dict:
    """The config as a run folder keeps it: re-running it never clears a folder by itself (overwrite off)."""
    data = config.to_dict()
    data["output"]["overwrite"] = False
    return data


# Settings that hold local paths: files users share carry only their last name (no home folders, no user names).
PATH_KEYS = ("model.name", "model.single_file_config", "model.vae", "data.images", "data.validation_images",
             "data.latent_cache_dir", "prior.class_images", "output.output", "output.resume")


def shareable_name(value: str | None) -> str | None:
    """A hub id (org/name) or 'tiny' as given; a local path as its last component (the folder or file name)."""
    if not value:
        return value
    path = Path(value).expanduser()
    if path.exists() or path.is_absolute() or value.startswith((".", "~")) or value.count("/") > 1 or "\\" in value:
        return path.name or value
    return value


def shareable_config_dict(config: RunConfig) -> dict:
    """The resolved config with local paths cut to their names (for files and trackers others may see)."""
    data = saved_config_dict(config)
    for dotted in PATH_KEYS:
        section, _, key = dotted.partition(".")
        if section in data and data[section].get(key):
            data[section][key] = shareable_name(str(data[section][key]))
    for entry in data["data"].get("datasets") or []:
        entry["images"] = shareable_name(entry["images"])
    return data


def shareable_config_yaml(config: RunConfig, image_count: int) -> str:
    """The resolved config for export metadata: local paths cut to their names, the images as a count."""
    import yaml

    data = shareable_config_dict(config)
    if data["data"]["images"]:
        data["data"]["images"] = f"{data['data']['images']} ({image_count} images)"
    return yaml.safe_dump(data, sort_keys=False)


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML that `sdft train` can re-run."""
    import yaml

    Path(path).write_text(yaml.safe_dump(saved_config_dict(config), sort_keys=False))


def field_flag(f: dataclasses.Field) -> str:
    """The CLI flag of a config field."""
    return "--" + (f.metadata.get("flag") or f.name.replace("_", "-"))


def field_kind(f: dataclasses.Field) -> tuple[type, bool, bool]:
    """(scalar type, is_list, is_optional) of a field's annotation."""
    hint = typing.get_type_hints(_owner_of(f), include_extras=False)[f.name]
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True, optional
    return hint, False, optional


def coerce(value: Any, f: dataclasses.Field, name: str) -> Any:
    """Convert a recipe/CLI value to the field's type, or raise a UserError naming the key."""
    scalar, is_list, optional = field_kind(f)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional or is_list:
            return [] if is_list else None
        raise UserError(f"{name} cannot be empty")
    try:
        if dataclasses.is_dataclass(scalar):
            return _entries(value, scalar, name)
        if is_list:
            items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
            return [_scalar(v, scalar) for v in items]
        return _scalar(value, scalar)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{name}={value!r}: expected {scalar.__name__}{' list' if is_list else ''}") from exc


def _entries(value: Any, kind: type, name: str) -> list:
    """A recipe list of mappings (e.g. data.datasets) as `kind` dataclasses, each key checked and coerced."""
    if isinstance(value, dict) or not isinstance(value, (list, tuple)):
        raise UserError(f"{name}: expected a list of mappings (- images: ...)")
    entries = []
    for index, item in enumerate(value):
        if dataclasses.is_dataclass(item):
            item = dataclasses.asdict(item)
        if not isinstance(item, dict):
            raise UserError(f"{name}[{index}]: expected a mapping (images: ..., repeats: ...), got {item!r}")
        fields = {f.name: f for f in dataclasses.fields(kind)}
        entry = kind()
        for key, raw in item.items():
            if key not in fields:
                raise UserError(f"unknown key '{name}[{index}].{key}'{_suggest(key, fields)}")
            setattr(entry, key, coerce(raw, fields[key], f"{name}[{index}].{key}"))
        entries.append(entry)
    return entries


def _scalar(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    if kind in (int, float) and isinstance(value, bool):
        raise ValueError(value)  # YAML's `steps: true` is not a number
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    if kind is str:
        return str(value).strip() if isinstance(value, str) else str(value)
    return kind(value)


_SECTION_CLASSES = [ModelConfig, DatasetConfig, DataConfig, TrainConfig, PriorConfig, OutputConfig, LoraConfig,
                    TextualInversionConfig, HypernetworkConfig, DreamBoothConfig, PivotalConfig]


def _owner_of(f: dataclasses.Field) -> type:
    for cls in _SECTION_CLASSES:
        if any(g is f for g in dataclasses.fields(cls)):
            return cls
    raise KeyError(f.name)


def _suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""
