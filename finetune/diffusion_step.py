"""The maths of one training step, as plain functions: noise, timesteps, the noised input, the target and
the per-sample loss. Every random draw comes from the sample's own generator (finetune.batching), in a fixed
order, so a resumed or multi-process run draws exactly what one uninterrupted run does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .losses import min_snr_weights, per_sample_loss, prediction_target


@dataclass
class StepMaths:
    """What the loss of a batch depends on besides the batch itself."""

    scheduler: object  # a DDPM-style noise scheduler (add_noise, alphas_cumprod)
    prediction_type: str  # 'epsilon' or 'v_prediction'
    train: object  # finetune.config.TrainConfig: noise_offset, input_perturbation, loss, huber_delta, snr_gamma
    unmasked_weight: float | None  # --alpha-mask: the loss share of masked-out cells; None: no masks
    device: torch.device

    @property
    def num_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)


def draw_noise(specs, shape: tuple[int, ...], noise_offset: float) -> torch.Tensor:
    """Each sample's Gaussian noise, plus a per-channel constant when noise_offset is set (darker/brighter
    images become learnable)."""
    noise = torch.stack([torch.randn(shape, generator=s.generator) for s in specs])
    if noise_offset:
        offset = torch.stack([torch.randn(shape[0], 1, 1, generator=s.generator) for s in specs])
        noise = noise + noise_offset * offset
    return noise


def draw_timesteps(specs, num_timesteps: int) -> torch.Tensor:
    """One uniformly drawn training timestep per sample."""
    return torch.cat([torch.randint(0, num_timesteps, (1,), generator=s.generator) for s in specs])


def perturbed_noise(noise: torch.Tensor, specs, amount: float) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023): the UNet sees slightly different noise than its target holds."""
    if not amount:
        return noise
    extra = torch.stack([torch.randn(noise.shape[1:], generator=s.generator) for s in specs])
    return noise + amount * extra.to(noise.device)


def sample_losses(maths: StepMaths, latents: torch.Tensor, masks: torch.Tensor, specs,
                  predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Per-sample (weighted) losses of one batch of latents; `predict(noisy, timesteps)` runs the model."""
    train = maths.train
    noise = draw_noise(specs, tuple(latents.shape[1:]), train.noise_offset).to(maths.device)
    timesteps = draw_timesteps(specs, maths.num_timesteps).to(maths.device)
    noisy = maths.scheduler.add_noise(latents, perturbed_noise(noise, specs, train.input_perturbation), timesteps)
    pred = predict(noisy, timesteps)
    target = prediction_target(maths.scheduler, latents, noise, timesteps, maths.prediction_type)
    loss_mask = None
    if maths.unmasked_weight is not None:
        # Masked-out cells keep a share of the loss (--unmasked-weight): some context is still learned.
        floor = maths.unmasked_weight
        loss_mask = floor + (1.0 - floor) * masks.to(pred.device)
    losses = per_sample_loss(pred, target, train.loss, train.huber_delta, loss_mask)
    if train.snr_gamma:
        losses = losses * min_snr_weights(maths.scheduler, timesteps, train.snr_gamma, maths.prediction_type)
    return losses
