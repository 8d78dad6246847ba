"""Resize a kohya LoRA to another rank: each module's change, re-factorised by SVD.

A module applies delta = up @ down * alpha / r. Its best rank-R approximation (Eckart-Young) keeps the share
sum(s[:R]^2) / sum(s^2) of the change's energy (squared Frobenius norm); that share is reported per module.
At the module's own rank or above, the result applies the same change (up to float32 rounding).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .lora_extract import low_rank_factors, shared_alpha_tensors


@dataclass
class ResizeReport:
    """How much of each module's change the smaller LoRA keeps (1.0 = all of it)."""

    kept_energy: dict[str, float] = field(default_factory=dict)

    def summary(self, worst: int = 5) -> str:
        if not self.kept_energy:
            return "no LoRA modules found"
        values = sorted(self.kept_energy.items(), key=lambda item: item[1])
        mean = sum(v for _, v in values) / len(values)
        lows = ", ".join(f"{stem} {value:.3f}" for stem, value in values[:worst])
        return f"{len(values)} modules, energy kept: mean {mean:.4f}, lowest {lows}"


def module_delta(up: torch.Tensor, down: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """The weight change a kohya module applies, shaped like its layer's weight."""
    rank = down.shape[0]
    scale = (alpha if alpha is not None else rank) / rank
    delta = up.reshape(up.shape[0], -1).double() @ down.reshape(rank, -1).double() * scale
    return delta.reshape(up.shape[0], *down.shape[1:]).float() if down.ndim == 4 else delta.float()


def resize_kohya(tensors: dict[str, torch.Tensor], rank: int) -> tuple[dict[str, torch.Tensor], ResizeReport]:
    """The kohya tensors of `tensors` at `rank` (never above a module's own rank), one shared alpha."""
    if rank < 1:
        raise ValueError("rank must be >= 1")
    stems = sorted({key.split(".", 1)[0] for key in tensors if key.endswith(".lora_down.weight")})
    factors, report = {}, ResizeReport()
    for stem in stems:
        up, down = tensors[f"{stem}.lora_up.weight"], tensors[f"{stem}.lora_down.weight"]
        alpha = tensors.get(f"{stem}.alpha")
        delta = module_delta(up.float(), down.float(), None if alpha is None else float(alpha))
        new_up, new_down, error = low_rank_factors(delta, min(rank, down.shape[0]))
        factors[stem] = (new_up, new_down)
        report.kept_energy[stem] = max(0.0, 1.0 - error**2)
    return shared_alpha_tensors(factors), report
