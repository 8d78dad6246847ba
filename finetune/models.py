"""Load a Stable Diffusion base (SD 1.x/2.x or SDXL): a hub id, a local diffusers folder, a single-file
checkpoint, or the built-in offline `tiny` base. The loaded base's family (finetune.families) is detected from
its files, or named with model.family."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import UserError
from .pipeline_cache import publish_pipeline

TINY_NAMES = ("tiny",)
# Bump when the tiny architecture or its weights change, so stale caches are never reused.
TINY_VERSION = "v5-toyworld"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def _sd_family():
    from .families import family_named

    return family_named("sd")


@dataclass
class Components:
    """The parts of a Stable Diffusion pipeline that training touches."""

    tokenizers: list  # one per text encoder, in the family's order
    text_encoders: list
    vae: Any
    unet: Any
    noise_scheduler: Any
    source: str  # a hub id or a local diffusers folder that from_pretrained can open
    resolution: int  # the base's native image size in pixels
    family: Any = field(default_factory=_sd_family)  # finetune.families.Family

    @property
    def tokenizer(self):
        """The first tokenizer (SD 1.x/2.x have only this one)."""
        return self.tokenizers[0]

    @property
    def text_encoder(self):
        """The first text encoder (SD 1.x/2.x have only this one; SDXL's CLIP-L)."""
        return self.text_encoders[0]

    @property
    def vae_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell along a side (8 for Stable Diffusion's VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def cache_root() -> Path:
    """Where sdft keeps generated files that outlive a run (built-in bases, class images)."""
    return Path(os.environ.get("SDFT_HOME", Path.home() / ".cache" / "sdft"))


def tiny_configs() -> dict[str, dict]:
    """Configs of the tiny SD-architecture base (64 px images, 16x16x4 latents, ~4M-param UNet).

    The built-in `tiny` base has these shapes, with weights pretrained on a toy world of coloured shapes.
    """
    return {
        "vae": dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
            block_out_channels=(32, 64, 64), sample_size=64,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        ),
        "unet": dict(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
            block_out_channels=(32, 64, 128), cross_attention_dim=64, attention_head_dim=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        ),
        "text_encoder": dict(
            hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            vocab_size=49408, max_position_embeddings=77, projection_dim=64,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        ),
        "scheduler": dict(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        ),
    }


def quiet_hf_progress_bars() -> None:
    """Loading bars from diffusers/transformers drown sdft's own progress output; turn them off."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def assemble_pipeline(vae, text_encoder, unet, scheduler):
    """A StableDiffusionPipeline of these parts with the offline CLIP tokenizer and no safety checker."""
    from diffusers import StableDiffusionPipeline

    from .tokenizer import build_clip_tokenizer

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def shipped_toy_base() -> Path:
    """The folder of the pretrained toy-world weights shipped in the package (fp16, built by `python -m lab toy-base`)."""
    from importlib import resources

    return Path(str(resources.files("finetune") / "assets" / "toy_base"))


def build_toy_pipeline(folder: Path):
    """The toy-world base as a float32 pipeline from its shipped fp16 parts and the offline tokenizer."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    if not (folder / "unet" / "config.json").exists():
        raise UserError(f"the built-in toy base is missing from {folder}; reinstall sdft, or rebuild it with "
                        f"`python -m lab toy-base --output {folder}`")
    return assemble_pipeline(
        AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32),
        CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32),
        UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32),
        DDIMScheduler.from_pretrained(folder / "scheduler"),
    )


def tiny_base_folder() -> Path:
    """A local diffusers folder (float32, tokenizer included) holding the toy base, built once and cached."""
    folder = cache_root() / "bases" / f"tiny-{TINY_VERSION}"

    def build():
        quiet_hf_progress_bars()
        return build_toy_pipeline(shipped_toy_base())

    return publish_pipeline(folder, build)


def is_toy_base_folder(path: Path) -> bool:
    """True for a folder as `python -m lab toy-base` writes it: model parts and pretrain.json, no model_index.json."""
    return ((path / "pretrain.json").exists() and (path / "unet" / "config.json").exists()
            and not (path / "model_index.json").exists())


def resolve_base(name: str) -> str:
    """Map --model to something load_pipeline opens, or raise a UserError."""
    if name in TINY_NAMES:
        return str(tiny_base_folder())
    path = Path(name).expanduser()
    if path.is_dir():
        if is_toy_base_folder(path):
            return str(path)  # load_pipeline assembles it with the offline tokenizer
        if not (path / "model_index.json").exists():
            raise UserError(f"--model {name}: folder has no model_index.json; pass a diffusers pipeline folder "
                            "(saved with save_pretrained), a .safetensors checkpoint, a hub id, or 'tiny'")
        check_pipeline_folder(path, name)
        return str(path)
    if path.suffix in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise UserError(f"--model {name}: file not found")
        if path.suffix == ".safetensors":
            from .inference import check_safetensors_file

            check_safetensors_file(path, "--model")
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"--model {name}: not found; pass a hub id (org/name), a local diffusers folder, "
                        "a .safetensors checkpoint, or 'tiny' (the built-in offline base)")
    return name  # a hub id


# Parts a Stable Diffusion pipeline cannot run without (model_index.json may list optional ones as null).
REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")


def check_pipeline_folder(path: Path, name: str) -> None:
    """A UserError naming the parts a diffusers folder lacks (a partial copy or download)."""
    import json

    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--model {name}: model_index.json cannot be read ({exc})") from exc
    missing = [part for part in REQUIRED_PARTS
               if isinstance(index.get(part), list) and index[part][0] is not None and not (path / part).is_dir()]
    if missing:
        raise UserError(f"--model {name}: the folder lacks {', '.join(p + '/' for p in missing)}, which its "
                        "model_index.json names; copy the whole pipeline folder")


def detect_family_name(source: str) -> str | None:
    """'sdxl' or 'sd' for a local diffusers folder or single file (from its pipeline class or its keys);
    None for a hub id, whose files are not here to read."""
    import json

    path = Path(source)
    if path.is_dir():
        if is_toy_base_folder(path):
            return "sd"
        index = json.loads((path / "model_index.json").read_text())
        return "sdxl" if "XL" in str(index.get("_class_name", "")) else "sd"
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            # SDXL's original layout keeps its two encoders under conditioner.embedders.{0,1}.
            return "sdxl" if any(k.startswith("conditioner.embedders.1.") for k in handle.keys()) else "sd"
    if path.suffix == ".ckpt":
        return "sd"
    return None


def load_pipeline(name: str, torch_dtype=None, single_file_config: str | None = None, family: str | None = None):
    """Load a full pipeline of the base's family for `name` (see resolve_base); `family` ('sd'/'sdxl')
    overrides the detection (needed for a hub id's SDXL)."""
    from diffusers import DiffusionPipeline

    from .families import family_named

    source = resolve_base(name)
    quiet_hf_progress_bars()
    if isinstance(torch_dtype, dict) and (is_toy_base_folder(Path(source)) or Path(source).suffix in
                                          SINGLE_FILE_SUFFIXES):
        torch_dtype = None  # per-component dtypes only through from_pretrained; the caller casts afterwards
    if is_toy_base_folder(Path(source)):
        pipe = build_toy_pipeline(Path(source))
        return pipe.to(dtype=torch_dtype) if torch_dtype is not None else pipe
    family = family or detect_family_name(source)
    pipeline_class = family_named(family).pipeline_class() if family else DiffusionPipeline
    kwargs: dict[str, Any] = dict(add_watermarker=False) if family == "sdxl" else \
        dict(safety_checker=None, requires_safety_checker=False)
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    try:
        if Path(source).suffix in SINGLE_FILE_SUFFIXES:
            if single_file_config:
                # A local folder supplies every config, so nothing is fetched and any shape loads.
                kwargs["config"] = str(resolve_base(single_file_config))
                kwargs["local_files_only"] = Path(kwargs["config"]).is_dir()
            pipe = pipeline_class.from_single_file(source, **kwargs)
        else:
            pipe = pipeline_class.from_pretrained(source, **kwargs)
        if getattr(pipe, "watermark", None) is not None:
            pipe.watermark = None  # an auto-detected SDXL hub model: samples and class images stay unmarked
        return pipe
    except (OSError, ValueError) as exc:
        if "/" in source and not Path(source).exists():
            raise UserError(f"--model {name}: could not load it from the hub ({type(exc).__name__}); "
                            "without network pass a local diffusers folder or 'tiny'") from exc
        raise UserError(f"--model {name}: could not be loaded ({' '.join(str(exc).split())[:200]})") from exc


def components_from_pipeline(pipe, source: str) -> Components:
    """Frozen, eval-mode training components taken from a pipeline."""
    from diffusers import DDPMScheduler

    from .families import family_of_pipeline

    family = family_of_pipeline(pipe)
    text_encoders = [getattr(pipe, part) for part in family.text_encoder_parts]
    for module in (*text_encoders, pipe.vae, pipe.unet):
        module.requires_grad_(False)
        module.eval()
    resolution = int(pipe.unet.config.sample_size) * (2 ** (len(pipe.vae.config.block_out_channels) - 1))
    return Components(
        tokenizers=[getattr(pipe, part) for part in family.tokenizer_parts], text_encoders=text_encoders,
        vae=pipe.vae, unet=pipe.unet, noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        source=source, resolution=resolution, family=family,
    )


def apply_model_options(components: Components, model) -> None:
    """Carry model.prediction_type / zero_terminal_snr into the components' schedule (so training, samples,
    class images and the exported pipeline all use them) and swap in model.vae when given."""
    from diffusers import DDPMScheduler

    overrides: dict[str, Any] = {}
    if model.prediction_type:
        overrides["prediction_type"] = model.prediction_type
    if model.zero_terminal_snr:
        # Lin et al. 2023: rescaled betas, and samplers that start from the last timestep ("trailing").
        overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    if overrides:
        components.noise_scheduler = DDPMScheduler.from_config(components.noise_scheduler.config, **overrides)
    if model.vae:
        components.vae = load_vae(model.vae)


def load_vae(name: str):
    """A replacement VAE (e.g. an fp16-safe SDXL VAE): a diffusers VAE folder, a .safetensors file or a hub id."""
    from diffusers import AutoencoderKL

    path = Path(name).expanduser()
    try:
        if path.is_dir():
            vae = AutoencoderKL.from_pretrained(path)
        elif path.suffix == ".safetensors" and path.is_file():
            vae = AutoencoderKL.from_single_file(str(path))
        elif not path.exists() and name.count("/") == 1 and not name.startswith((".", "/", "~")):
            vae = AutoencoderKL.from_pretrained(name)  # a hub id, e.g. madebyollin/sdxl-vae-fp16-fix
        else:
            raise UserError(f"--vae {name}: pass a diffusers VAE folder (with config.json), a .safetensors file "
                            "or a hub id")
    except (OSError, ValueError) as exc:
        raise UserError(f"--vae {name}: could not be loaded ({' '.join(str(exc).split())[:200]})") from exc
    vae.requires_grad_(False)
    return vae.eval()


def load_components(name: str, single_file_config: str | None = None, family: str | None = None,
                    dtypes: dict | None = None) -> Components:
    """Load the trainable parts of the base `name`, all frozen, on the CPU: in float32, or per component as
    `dtypes` says ({"default": torch.bfloat16, "unet": torch.float32, ...}; a diffusers folder or hub id loads
    each straight in its dtype, so no float32 copy of the whole pipeline is ever held)."""
    pipe = load_pipeline(name, torch_dtype=dtypes, single_file_config=single_file_config, family=family)
    source = resolve_base(name)
    if Path(source).suffix in SINGLE_FILE_SUFFIXES:
        # Summaries name a folder from_pretrained can open: convert the file once into the cache.
        folder = cache_root() / "bases" / ("file-" + Path(source).stem)
        source = str(publish_pipeline(folder, lambda: pipe))
    return components_from_pipeline(pipe, source)
