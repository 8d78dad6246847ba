"""Noise targets, timestep sampling and loss weighting shared by every strategy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prediction_target(scheduler, latents, noise, timesteps, prediction_type: str):
    """What the UNet should predict: the noise (epsilon) or the velocity (v-prediction)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def snr(scheduler, timesteps) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weights(scheduler, timesteps, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023): min(SNR, gamma) / SNR, or / (SNR + 1) for v."""
    ratio = snr(scheduler, timesteps)
    clipped = torch.clamp(ratio, max=gamma)
    return clipped / (ratio + 1.0) if prediction_type == "v_prediction" else clipped / ratio


def per_sample_loss(pred, target, kind: str = "l2", huber_delta: float = 0.1, mask=None) -> torch.Tensor:
    """Per-sample loss in float32: mean squared error (l2), mean absolute error (l1) or Huber.

    `mask` (B, 1, H, W) weights each latent cell (--alpha-mask): 0 where the image was transparent. As in
    kohya's masked loss the mean stays over all cells, so a small subject is not up-weighted.
    """
    pred, target = pred.float(), target.float()
    if kind == "l2":
        loss = F.mse_loss(pred, target, reduction="none")
    elif kind == "l1":
        loss = F.l1_loss(pred, target, reduction="none")
    elif kind == "huber":
        loss = F.huber_loss(pred, target, reduction="none", delta=huber_delta)
    else:
        raise ValueError(f"unknown loss {kind!r}")
    if mask is not None:
        loss = loss * mask.to(loss.dtype)
    return loss.mean(dim=tuple(range(1, pred.ndim)))
