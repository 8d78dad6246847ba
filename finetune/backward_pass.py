"""The fused backward pass: each trained weight is updated inside the backward pass as soon as its gradient is
complete, and that gradient is freed at once, so the gradients of the whole model never exist together.

For a full fine-tune this saves one float32 copy of the trained weights (SD1.5's UNet: 3.4 GB; SDXL's: 10 GB).
The update is the optimizer's own, on one tensor at a time; what changes is gradient clipping, which can only
see the tensor in hand (norm per weight tensor, as kohya's --fused_backward_pass clips too). With clipping off
the weights are exactly those of the ordinary step.
"""

from __future__ import annotations

import logging

import torch

from . import UserError
from .optimizers import FUSED_CPU_MIN_PARAMETERS

log = logging.getLogger(__name__)

# Optimizers whose update of a tensor reads that tensor's gradient and state alone (no quantities shared
# across tensors, such as Prodigy's step-size estimate or a schedule-free group counter; bitsandbytes keys its
# state by the position of a tensor in the groups).
PER_TENSOR_OPTIMIZERS = ("adamw", "adafactor", "lion")


def refusal(tcfg, num_processes: int) -> str | None:
    """Why a fused backward pass cannot run with these settings (None: it can)."""
    if tcfg.optimizer not in PER_TENSOR_OPTIMIZERS:
        return f"train.optimizer={tcfg.optimizer} updates all weights together; use {', '.join(PER_TENSOR_OPTIMIZERS)}"
    if tcfg.mixed_precision == "fp16":
        return "fp16's loss scaling can only skip a whole step; use bf16"
    if num_processes > 1:
        return "with several processes the gradients are averaged after the backward pass"
    if tcfg.grad_accum > 1:
        return "with gradient accumulation every gradient is kept until the last micro-step (no memory saved)"
    return None


def check_fused_backward(tcfg, num_processes: int) -> None:
    """train.fused_backward_pass=on with settings it cannot honour: a one-line error before anything loads."""
    reason = refusal(tcfg, num_processes) if tcfg.fused_backward_pass == "on" else None
    if reason:
        raise UserError(f"train.fused_backward_pass=on: {reason} (or --fused-backward-pass off)")


def wanted(tcfg, trained_params, num_processes: int, full_fine_tune: bool) -> bool:
    """Whether this run updates inside the backward pass: `on`, or `auto` for full fine-tunes (a whole model
    trains) of 10M+ values, where the gradients are gigabytes, with settings that allow it. Adapters and textual
    inversion keep the ordinary step under auto: their gradients are small, and the per-tensor clipping would
    change how they train for little memory."""
    if tcfg.fused_backward_pass == "off" or refusal(tcfg, num_processes):
        return False
    if tcfg.fused_backward_pass == "on":
        return True
    # A compiled UNet's backward produces all its gradients together: nothing would be saved.
    return (full_fine_tune and not tcfg.compile_unet
            and sum(p.numel() for p in trained_params) >= FUSED_CPU_MIN_PARAMETERS)


class UpdatesInBackward:
    """Within its block, steps `optimizer` on each parameter from a post-accumulate-grad hook, then drops the
    gradient.

    The one optimizer keeps every tensor's state and its groups' learning rates (the lr schedule and checkpoints
    see it as usual); each hook shows it a single-tensor view of the tensor's group for one step call. The group
    is looked up by position on every call: loading a checkpoint replaces the optimizer's group dicts."""

    def __init__(self, optimizer, params: list[torch.nn.Parameter], max_grad_norm: float):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # past accelerate's wrapper: no extra logic
        self.params, self.max_grad_norm = params, max_grad_norm
        self.group_index = {id(p): i for i, group in enumerate(self.optimizer.param_groups) for p in group["params"]}
        self.handles = []

    def _update(self, param: torch.Tensor) -> None:
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([param], self.max_grad_norm)
        groups = self.optimizer.param_groups
        try:
            self.optimizer.param_groups = [dict(groups[self.group_index[id(param)]], params=[param])]
            self.optimizer.step()
        finally:
            self.optimizer.param_groups = groups
        param.grad = None

    def __enter__(self) -> UpdatesInBackward:
        self.handles = [p.register_post_accumulate_grad_hook(self._update) for p in self.params]
        return self

    def __exit__(self, *exc) -> None:
        """Detach the hooks when the block ends, however it ends: later backward passes (a caller's, on the same
        components) are left alone."""
        for handle in self.handles:
            handle.remove()
        self.handles = []


def install(tcfg, optimizer, trained_params, num_processes: int, full_fine_tune: bool) -> UpdatesInBackward | None:
    """The per-tensor updater when this run updates inside the backward pass (hooks on while its block runs),
    else None (the loop steps as usual)."""
    if not wanted(tcfg, trained_params, num_processes, full_fine_tune):
        return None
    log.info("fused backward pass: each weight updates as soon as its gradient is complete (gradient clipping per "
             "weight tensor); --fused-backward-pass off for the usual step")
    return UpdatesInBackward(optimizer, trained_params, tcfg.max_grad_norm)
