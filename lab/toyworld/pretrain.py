"""Pretrain the built-in toy-world base from a seed: first the VAE, then the text encoder and UNet jointly.

The recipe is sized for a 2-core CPU: a small AutoencoderKL trained mostly on 32 px
crops (4x more steps per second), latents of the whole image pool encoded once, then epsilon prediction with
min-SNR-5 weighting, 10% empty captions (classifier-free guidance) and a warm-up + cosine schedule.
Everything random comes from generators seeded by PretrainConfig.seed, so a rerun on the same machine and
torch version gives the same weights.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from finetune import UserError
from finetune.ema import TrainedWeightsEMA
from finetune.losses import min_snr_weights
from finetune.models import quiet_hf_progress_bars

from ..random_bases import build_random_pipeline
from .settings import PretrainConfig
from .world import SHAPES, caption, random_scene, render


def render_pool(count: int, seed: int) -> tuple[torch.Tensor, list]:
    """`count` rendered scenes of the base world as uint8 NCHW, with their Scene records."""
    rng = random.Random(seed)
    scenes = [random_scene(rng, shapes=SHAPES) for _ in range(count)]
    pixels = np.stack([np.asarray(render(scene)) for scene in scenes])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), scenes


PRECISIONS = ("fp32", "bf16")


def precision_autocast(cfg: PretrainConfig, device):
    """The forward passes' precision context: bf16 autocast, or nothing for fp32."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def build_adamw(params, cfg: PretrainConfig, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW for a pretraining stage; torch's fused kernel when cfg.fused_optimizer."""
    # fused=None lets torch pick its default (foreach), the implementation the shipped base was trained with
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=cfg.fused_optimizer or None)


def prepare_for_precision(pipe, cfg: PretrainConfig) -> None:
    """Check cfg.precision; for bf16 switch the UNet and VAE to diffusers' matmul-softmax attention processor.

    Under bf16 autocast torch's CPU flash-attention backward is ~10x slower than fp32 for these tiny heads; the plain
    processor (same maths) is not. fp32 keeps the default SDPA path the shipped base was trained with."""
    if cfg.precision not in PRECISIONS:
        raise UserError(f"--precision {cfg.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if cfg.precision == "bf16":
        from diffusers.models.attention_processor import AttnProcessor

        pipe.unet.set_attn_processor(AttnProcessor())
        pipe.vae.set_attn_processor(AttnProcessor())


def main_caption_share(cfg: PretrainConfig, step: int) -> float:
    """The share of main-phrasing captions at this UNet step (a linear curriculum when main_caption_start is set)."""
    if cfg.main_caption_start is None:
        return cfg.main_caption_rate
    progress = step / max(1, cfg.unet_steps - 1)
    return cfg.main_caption_start + (cfg.main_caption_rate - cfg.main_caption_start) * progress


def _to_unit(batch: torch.Tensor) -> torch.Tensor:
    return batch.float() / 127.5 - 1.0


def _cosine(step: int, total: int, peak: float, floor: float, warmup: int = 0) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def split_held_out(pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out, training) parts of the pool: the first min(256, 1/4) renders are never trained on."""
    held = min(256, len(pool) // 4)
    return pool[:held], pool[held:]


def random_window(size: int, window: int, generator: torch.Generator) -> tuple[int, int]:
    """Top-left (y, x) of a random window x window square inside a size x size grid (one generator draw)."""
    y, x = torch.randint(0, size - window + 1, (2,), generator=generator).tolist()
    return y, x


def train_vae(vae, pool: torch.Tensor, cfg: PretrainConfig, log, device) -> float:
    """Train the autoencoder to reconstruct the pool; returns the final PSNR (dB) on the held-out renders."""
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    held_out, train_pool = split_held_out(pool)
    vae.train()
    optimizer = build_adamw(vae.parameters(), cfg, cfg.vae_lr, 0.0)
    crop_steps = int(cfg.vae_steps * cfg.vae_crop_fraction)
    started = time.time()
    for step in range(cfg.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine(step, cfg.vae_steps, cfg.vae_lr, cfg.vae_lr * 0.05)
        index = torch.randint(len(train_pool), (cfg.vae_batch,), generator=generator)
        batch = _to_unit(train_pool[index]).to(device)
        if step < crop_steps:
            # Plain backgrounds and shape edges look the same at any scale: crops teach them 4x cheaper.
            y, x = random_window(batch.shape[-1], 32, generator)
            batch = batch[:, :, y:y + 32, x:x + 32]
        with precision_autocast(cfg, device):
            posterior = vae.encode(batch).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
            recon = vae.decode(posterior.mean + posterior.std * noise).sample.float()
            kl = posterior.kl().float().mean()
        loss = F.mse_loss(recon, batch) + F.l1_loss(recon, batch) + cfg.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step}/{cfg.vae_steps} loss {loss.item():.4f} ({time.time() - started:.0f} s)")
    vae.eval()
    return reconstruction_psnr(vae, held_out, device)


def train_decoder(vae, pool: torch.Tensor, means: torch.Tensor, cfg: PretrainConfig, log, device) -> None:
    """Fine-tune only the VAE decoder to reconstruct the pool from its (fixed) posterior means.

    The encoder and the latents stay as they are, so a UNet trained on this VAE keeps working; only the
    pixels it decodes to get sharper. Crop steps decode 8x8 latent windows to their 32 px image windows."""
    generator = torch.Generator().manual_seed(cfg.seed + 4)
    trained = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    vae.requires_grad_(False)
    for param in trained:
        param.requires_grad_(True)
    optimizer = build_adamw(trained, cfg, cfg.decoder_lr, 0.0)
    crop_steps = int(cfg.decoder_steps * cfg.decoder_crop_fraction)
    latent_size = means.shape[-1]
    factor = pool.shape[-1] // latent_size
    vae.train()
    started = time.time()
    for step in range(cfg.decoder_steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine(step, cfg.decoder_steps, cfg.decoder_lr, cfg.decoder_lr * 0.05)
        index = torch.randint(len(pool), (cfg.vae_batch,), generator=generator)
        target, latents = _to_unit(pool[index]).to(device), means[index]
        if step < crop_steps:
            window = latent_size // 2
            y, x = random_window(latent_size, window, generator)
            latents = latents[:, :, y:y + window, x:x + window]
            target = target[:, :, y * factor:(y + window) * factor, x * factor:(x + window) * factor]
        with precision_autocast(cfg, device):
            recon = vae.decode(latents).sample.float()
        loss = F.mse_loss(recon, target) + F.l1_loss(recon, target)
        if cfg.decoder_edge_weight:
            # Differences of neighbouring pixels: tips and edges are few pixels, so MSE alone lets them blur.
            loss = loss + cfg.decoder_edge_weight * (F.l1_loss(recon.diff(dim=2), target.diff(dim=2))
                                                     + F.l1_loss(recon.diff(dim=3), target.diff(dim=3)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == cfg.decoder_steps - 1:
            log(f"decoder step {step}/{cfg.decoder_steps} loss {loss.item():.4f} ({time.time() - started:.0f} s)")
    vae.requires_grad_(True)
    vae.eval()


@torch.no_grad()
def reconstruction_psnr(vae, images: torch.Tensor, device="cpu") -> float:
    """Mean PSNR (dB, pixel range 0-255) of decode(encode(x).mean) over images."""
    total = 0.0
    for chunk in images.split(64):
        x = _to_unit(chunk).to(device)
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        mse = ((recon - x) ** 2).mean(dim=(1, 2, 3)) / 4.0  # back to the 0-1 range
        total += (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).sum().item()
    return total / len(images)


@torch.no_grad()
def encode_pool(vae, pool: torch.Tensor, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every pool image (drawn from again at every UNet step)."""
    means, stds = [], []
    for chunk in pool.split(128):
        posterior = vae.encode(_to_unit(chunk).to(device)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(pipe, means, stds, scenes, cfg: PretrainConfig, log, device) -> None:
    """Train text encoder and UNet together on the encoded pool with varied captions."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    scale = pipe.vae.config.scaling_factor
    generator = torch.Generator().manual_seed(cfg.seed + 2)
    caption_rng = random.Random(cfg.seed + 3)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = build_adamw(params, cfg, cfg.unet_lr, 1e-2)
    average = TrainedWeightsEMA(params, cfg.ema_decay) if cfg.ema_decay > 0 else None
    unet.train()
    text_encoder.train()
    started = time.time()
    for step in range(cfg.unet_steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine(step, cfg.unet_steps, cfg.unet_lr, cfg.unet_min_lr, cfg.unet_warmup)
        index = torch.randint(len(means), (cfg.unet_batch,), generator=generator)
        draw = torch.randn(means[index].shape, generator=generator).to(device)
        latents = (means[index] + stds[index] * draw) * scale
        main_share = main_caption_share(cfg, step)
        captions = ["" if caption_rng.random() < cfg.empty_caption_rate
                    else caption(scenes[i], caption_rng, main_share) for i in index.tolist()]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        noise = torch.randn(latents.shape, generator=generator)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn(*latents.shape[:2], 1, 1, generator=generator)
        noise = noise.to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=generator)
        timesteps = timesteps.to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with precision_autocast(cfg, device):
            hidden = text_encoder(ids)[0]
            pred = unet(noisy, timesteps, hidden).sample.float()
        losses = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (losses * min_snr_weights(scheduler, timesteps, cfg.snr_gamma, "epsilon")).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        if average is not None:
            average.step()
        if step % 50 == 0 or step == cfg.unet_steps - 1:
            log(f"unet step {step}/{cfg.unet_steps} loss {loss.item():.4f} ({time.time() - started:.0f} s)")
    if average is not None:
        average.copy_to_params()
    unet.eval()
    text_encoder.eval()


def pretrain(cfg: PretrainConfig, output: Path, log=print):
    """Build the toy base from cfg.seed and save it as an fp16 diffusers folder at `output`."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    quiet_hf_progress_bars()
    timings = {}
    started = time.time()
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.decoder_steps and not cfg.init_from:
        raise UserError("--decoder-steps fine-tunes the decoder of an existing base: pass --init-from FOLDER too")
    if cfg.init_from:
        from finetune.models import build_toy_pipeline

        pipe = build_toy_pipeline(Path(cfg.init_from)).to(device)
    else:
        pipe = build_random_pipeline("tiny", seed=cfg.seed).to(device)
    prepare_for_precision(pipe, cfg)
    pool, scenes = render_pool(cfg.images, cfg.seed)
    timings["render_s"] = round(time.time() - started, 1)
    log(f"rendered {len(pool)} images in {timings['render_s']} s")

    psnr = None
    if not cfg.init_from:
        mark = time.time()
        psnr = train_vae(pipe.vae, pool, cfg, log, device)
        timings["vae_s"] = round(time.time() - mark, 1)
        log(f"vae: PSNR {psnr:.2f} dB on held-out images ({timings['vae_s']} s)")
    pipe.vae.eval()

    mark = time.time()
    means, stds = encode_pool(pipe.vae, pool, device)
    if not cfg.sample_posterior:
        stds = torch.zeros_like(stds)
    if not cfg.init_from:
        # SD's convention: scaled latents have unit variance, so the noise schedule fits them.
        pipe.vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    timings["encode_s"] = round(time.time() - mark, 1)
    log(f"encoded the pool in {timings['encode_s']} s; scaling_factor {pipe.vae.config.scaling_factor:.4f}")

    if cfg.decoder_steps:
        mark = time.time()
        held_out, train_pool = split_held_out(pool)  # as in train_vae: renders this run never trains on
        before = reconstruction_psnr(pipe.vae, held_out, device)
        train_decoder(pipe.vae, train_pool, means[len(held_out):], cfg, log, device)
        psnr = reconstruction_psnr(pipe.vae, held_out, device)
        timings["decoder_s"] = round(time.time() - mark, 1)
        log(f"decoder: PSNR {before:.2f} -> {psnr:.2f} dB on held-out images ({timings['decoder_s']} s)")

    mark = time.time()
    train_unet(pipe, means, stds, scenes, cfg, log, device)
    timings["unet_s"] = round(time.time() - mark, 1)
    timings["total_s"] = round(time.time() - started, 1)

    output = Path(output)
    save_toy_base(pipe, output)
    report = {"config": asdict(cfg), "device": device, "vae_psnr_db": psnr and round(psnr, 2), "timings": timings,
              "torch": torch.__version__}
    (output / "pretrain.json").write_text(json.dumps(report, indent=2))
    log(f"saved the toy base to {output} ({timings['total_s']} s in all)")
    return report


def save_toy_base(pipe, output: Path) -> None:
    """Save the models as fp16 safetensors plus configs, one folder each (the tokenizer is built offline)."""
    for name in ("unet", "vae", "text_encoder"):
        getattr(pipe, name).to("cpu", torch.float16).save_pretrained(output / name, safe_serialization=True)
    pipe.scheduler.save_pretrained(output / "scheduler")
