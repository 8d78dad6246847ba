"""Exponential moving average of the trained weights (diffusers' EMAModel), optionally kept in CPU memory.

Checkpoints store the average as safetensors (accelerate's own custom-state files are pickles, which sdft
never loads), so a resumed run continues the same average bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch

EMA_FILE = "ema.safetensors"


class TrainedWeightsEMA:
    """The EMA of a fixed list of parameters; `decay` is warmed up as min(decay, (1 + t) / (10 + t))."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, on_cpu: bool = False):
        from diffusers.training_utils import EMAModel

        self.params = params
        self.on_cpu = on_cpu
        self.average = EMAModel(params, decay=decay)
        if on_cpu:
            self.average.to("cpu")

    def step(self) -> None:
        """Fold the current weights into the average (call after each optimizer step)."""
        if self.on_cpu:
            # EMAModel updates in place on the shadow's device: bring it over, update, send it back.
            self.average.to(self.params[0].device)
            self.average.step(self.params)
            self.average.to("cpu")
        else:
            self.average.step(self.params)

    def copy_to_params(self) -> None:
        """Replace the trained weights by their average (before the final samples and exports)."""
        self.average.copy_to(self.params)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        tensors = {f"shadow.{i}": t.detach().to("cpu").contiguous() for i, t in enumerate(self.average.shadow_params)}
        save_file(tensors, str(Path(folder) / EMA_FILE),
                  metadata={"optimization_step": str(self.average.optimization_step)})

    def load(self, folder: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(Path(folder) / EMA_FILE), framework="pt") as handle:
            step = int(handle.metadata()["optimization_step"])
            for i, shadow in enumerate(self.average.shadow_params):
                shadow.data.copy_(handle.get_tensor(f"shadow.{i}"))
        self.average.optimization_step = step
