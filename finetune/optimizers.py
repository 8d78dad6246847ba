"""The optimizer a run trains with, chosen by `train.optimizer`, from the packages the field uses.

Optional ones install as extras (`pip install "sdft[optimizers]"`, or one of prodigy, lion, schedulefree, bnb);
a missing one is a one-line error naming its extra.
Every optimizer here keeps its whole state in `state_dict()`, so checkpoints resume it exactly.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from . import UserError
from .config import OPTIMIZERS

log = logging.getLogger(__name__)

# optimizer name -> (module to import, pip extra that installs it); None: always available.
OPTIONAL_PACKAGES = {"prodigy": ("prodigyopt", "prodigy"), "lion": ("lion_pytorch", "lion"),
                     "adamw_schedulefree": ("schedulefree", "schedulefree"), "adamw8bit": ("bitsandbytes", "bnb")}


def _import(name: str):
    module, extra = OPTIONAL_PACKAGES[name]
    try:
        return __import__(module)
    except ImportError as exc:
        raise UserError(f"train.optimizer={name} needs the {module} package: pip install \"sdft[{extra}]\"") from exc


# On a CPU the fused AdamW kernel pays off for large trained sets (860M UNet weights: 0.56 s a step against the
# loop's 3.2 s, lab.benchmarks.levers); below this size the loop costs little and keeps earlier runs bit-exact.
FUSED_CPU_MIN_PARAMETERS = 10_000_000


def use_fused_kernel(param_groups, device) -> bool:
    """train.fused_optimizer=auto: the fused kernel on CUDA, and on a CPU for trained sets of 10M+ values."""
    if torch.device(device).type == "cuda":
        return True
    count = sum(p.numel() for group in param_groups for p in group["params"])
    return torch.device(device).type == "cpu" and count >= FUSED_CPU_MIN_PARAMETERS


def make_optimizer(tcfg, param_groups, device) -> torch.optim.Optimizer:
    """The optimizer of `tcfg.optimizer` over `param_groups` (groups may carry their own lr)."""
    name = tcfg.optimizer
    betas, decay = (tcfg.adam_beta1, tcfg.adam_beta2), tcfg.weight_decay
    if name == "adamw":
        # Not under fp16: the fused kernel always steps, so a skipped (overflowed) step would still advance the lr.
        auto = tcfg.fused_optimizer == "auto" and tcfg.mixed_precision != "fp16" and use_fused_kernel(param_groups,
                                                                                                    device)
        options = dict(lr=tcfg.lr, betas=betas, eps=tcfg.adam_epsilon, weight_decay=decay)
        if tcfg.fused_optimizer == "on" or auto:
            try:
                return torch.optim.AdamW(param_groups, fused=True, **options)
            except (RuntimeError, TypeError) as exc:  # a torch, device or dtype the fused kernel does not cover
                if not auto:
                    raise UserError(f"train.fused_optimizer=on: {exc}; use auto or off") from exc
                log.info("fused AdamW unavailable here (%s): the per-tensor loop trains instead", exc)
        return torch.optim.AdamW(param_groups, **options)
    if name == "adamw8bit":
        if torch.device(device).type != "cuda":
            raise UserError("train.optimizer=adamw8bit needs a CUDA GPU; use adamw on this machine")
        return _import(name).optim.AdamW8bit(param_groups, lr=tcfg.lr, betas=betas, eps=tcfg.adam_epsilon,
                                             weight_decay=decay)
    if name == "prodigy":
        if tcfg.lr < 0.1:
            # Prodigy estimates the step size itself; lr only scales that estimate (1.0 as its authors advise).
            log.warning("train.optimizer=prodigy with lr %g: Prodigy's lr is a multiplier of the step size it "
                        "finds, usually 1.0 (--lr 1)", tcfg.lr)
        return _import(name).Prodigy(param_groups, lr=tcfg.lr, betas=betas, eps=tcfg.adam_epsilon,
                                     weight_decay=decay, d_coef=tcfg.prodigy_d_coef,
                                     use_bias_correction=tcfg.prodigy_bias_correction,
                                     safeguard_warmup=tcfg.prodigy_safeguard_warmup)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # Relative step: Adafactor's own time-dependent step size (no lr); else the run's lr, fixed.
        relative = tcfg.adafactor_relative_step
        return Adafactor(param_groups, lr=None if relative else tcfg.lr, relative_step=relative,
                         scale_parameter=relative, warmup_init=False, weight_decay=decay)
    if name == "lion":
        return _import(name).Lion(param_groups, lr=tcfg.lr, betas=(tcfg.adam_beta1, 0.99), weight_decay=decay)
    if name == "adamw_schedulefree":
        optimizer = _import(name).AdamWScheduleFree(param_groups, lr=tcfg.lr, betas=betas, eps=tcfg.adam_epsilon,
                                                    weight_decay=decay, warmup_steps=tcfg.lr_warmup_steps)
        optimizer.train()
        return optimizer
    raise UserError(f"train.optimizer={name}: choose one of {', '.join(OPTIMIZERS)}")


@contextlib.contextmanager
def averaged_weights(optimizer, params):
    """Within the block, a schedule-free optimizer's parameters are its averaged (eval) point; afterwards exactly
    the training point again (restored from a copy: the eval/train switch is not bit-exact both ways)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not (hasattr(inner, "eval") and hasattr(inner, "train")):
        yield
        return
    saved = [p.detach().clone() for p in params]
    inner.eval()
    try:
        yield
    finally:
        inner.train()
        with torch.no_grad():
            for param, value in zip(params, saved):
                param.copy_(value)


def set_training_mode(optimizer, training: bool) -> None:
    """Schedule-free optimizers keep two points: train on one, sample and export the averaged one (eval).
    A no-op for every other optimizer."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps optimizers
    switch = getattr(inner, "train" if training else "eval", None)
    if callable(switch) and hasattr(inner, "train") and hasattr(inner, "eval"):
        switch()
