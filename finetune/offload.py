"""Frozen models out of the accelerator's memory while the training steps do not need them.

Once every latent is cached the VAE has nothing to do until the sample grid, and text encoders that do not train
only encode prompts the cache has not seen yet. With train.offload_frozen their weights leave the device for the
steps: a copy is kept in CPU memory and the module itself becomes storage-free (PyTorch's meta device), so any
use while offloaded fails loudly instead of silently running on the wrong device. A short block that needs them
(a new prompt, a sample grid, the exports) brings them back and sends them off again.
"""

from __future__ import annotations

import contextlib
import itertools
import logging

import torch

log = logging.getLogger(__name__)


def wanted(setting: str, device) -> bool:
    """train.offload_frozen: on; auto = on a GPU (on a CPU the weights already live in host memory)."""
    return setting == "on" or (setting == "auto" and torch.device(device).type != "cpu")


class OffloadedModule:
    """One frozen module whose tensors can leave `device` (kept in CPU memory) and come back bit for bit."""

    def __init__(self, module: torch.nn.Module, device):
        self.module, self.device = module, device
        # Parameters and every buffer (non-persistent ones too, e.g. CLIP's position ids: state_dict skips them).
        tensors = itertools.chain(module.named_parameters(), module.named_buffers())
        # Page-locked on CUDA machines: the copy back runs at the bus's full speed.
        pin = torch.device(device).type == "cuda" and torch.cuda.is_available()
        self.host = {name: _host_copy(tensor, pin) for name, tensor in tensors}
        self.away = False

    def send_away(self) -> None:
        if not self.away:
            self.module.to("meta")
            self.away = True

    def bring_back(self) -> None:
        if self.away:
            self.module.to_empty(device=self.device)
            with torch.no_grad():
                for name, tensor in itertools.chain(self.module.named_parameters(), self.module.named_buffers()):
                    tensor.copy_(self.host[name])
            self.away = False


def _host_copy(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    copy = tensor.detach().to("cpu", copy=True)
    return copy.pin_memory() if pin else copy


class FrozenOffload:
    """The VAE (when every latent is cached) and the frozen text encoders, off the device between uses; with no
    modules, every block is a no-op (the run offloads nothing)."""

    def __init__(self, modules: list[torch.nn.Module], device):
        self.parts = [OffloadedModule(module, device) for module in modules]

    def __enter__(self) -> FrozenOffload:
        for part in self.parts:
            part.send_away()
        return self

    def __exit__(self, *exc) -> None:
        """Every module back on the device, however the loop ended (exports and samples follow); the host copies
        are let go."""
        for part in self.parts:
            part.bring_back()
            part.host = {}

    @contextlib.contextmanager
    def present(self, modules=None):
        """Within the block the offloaded modules (or those of `modules` among them) are on the device again."""
        # Only those away now: a block inside another leaves the outer one's modules where it found them.
        parts = [p for p in self.parts if p.away and (modules is None or any(p.module is m for m in modules))]
        for part in parts:
            part.bring_back()
        try:
            yield
        finally:
            for part in parts:
                part.send_away()


def frozen_offload(tcfg, components, device, latents_cached: bool, text_encoders_train: bool,
                   prompts_vary: bool = False) -> FrozenOffload:
    """What this run offloads (no modules: nothing, the loop runs as before). Under auto the text encoders stay
    when captions are shuffled: nearly every step would meet a new prompt and bring them back. Nothing leaves the
    device before the block is entered."""
    if not wanted(tcfg.offload_frozen, device):
        return FrozenOffload([], device)
    texts = not text_encoders_train and not (prompts_vary and tcfg.offload_frozen == "auto")
    modules = ([components.vae] if latents_cached else []) + (list(components.text_encoders) if texts else [])
    if modules:
        log.info("offloading %s to CPU memory during the steps",
                 " and ".join((["the VAE"] if latents_cached else []) + (["the text encoders"] if texts else [])))
    return FrozenOffload(modules, device)
