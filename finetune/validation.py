"""Validation loss: the model's denoising error on held-out images at fixed timesteps and fixed noise.

Everything random is fixed per image (its noise, drawn once from a seeded generator) and the timesteps are
spread evenly over the schedule, so the number moves only when the model does: comparable between steps of
one run and between runs. A rising validation loss while the training loss falls is overtraining.
"""

from __future__ import annotations

import logging

import torch

from . import UserError
from .data import Example

log = logging.getLogger(__name__)
NOISE_SEED = 20_240_601


def split_validation(examples: list[Example], share: float) -> tuple[list[Example], list[Example]]:
    """(training, held-out): every k-th image (k = 1 / share, by file order) is held out, at least one."""
    if share <= 0:
        return examples, []
    if len(examples) < 2:
        raise UserError("data.validation_share needs at least 2 images (one to train on, one to hold out)")
    step = max(2, round(1 / share))
    held = examples[step - 1::step] or examples[-1:]
    return [e for e in examples if e not in held], held


class ValidationSet:
    """Latents (the VAE posterior's mean), captions, noise and timesteps of the held-out images, fixed once."""

    def __init__(self, examples: list[Example], vae, vae_scale: float, resolution: int, num_timesteps: int,
                 timesteps: int, device, dtype) -> None:
        from .data import centre_crop_size_condition, to_training_tensor

        self.captions = [e.caption for e in examples]
        self.sizes = [centre_crop_size_condition(e.image.size, resolution) for e in examples]
        with torch.no_grad():
            pixels = torch.stack([to_training_tensor(e.image.convert("RGB"), resolution) for e in examples])
            self.latents = vae.encode(pixels.to(device, dtype)).latent_dist.mean.float() * vae_scale
        generator = torch.Generator().manual_seed(NOISE_SEED)
        self.noise = torch.randn(self.latents.shape, generator=generator).to(device)
        # Evenly spaced over the schedule, away from both ends: t = T (2i + 1) / (2n).
        self.timesteps = [int(num_timesteps * (2 * i + 1) / (2 * timesteps)) for i in range(timesteps)]

    def loss(self, predict, scheduler, prediction_type: str) -> float:
        """Mean squared error over every image and timestep; `predict(noisy, t, captions, sizes)` runs the model."""
        from .losses import prediction_target

        total = 0.0
        with torch.no_grad():
            for step in self.timesteps:
                t = torch.full((len(self.captions),), step, dtype=torch.long, device=self.latents.device)
                noisy = scheduler.add_noise(self.latents, self.noise, t)
                target = prediction_target(scheduler, self.latents, self.noise, t, prediction_type)
                total += torch.mean((predict(noisy, t, self.captions, self.sizes).float() - target.float()) ** 2).item()
        return total / len(self.timesteps)
