"""The strategy protocol every fine-tuning method implements, and the registry of methods."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from ..config import RunConfig
    from ..models import Components


@runtime_checkable
class Strategy(Protocol):
    """What the shared trainer needs from a method. Plain classes satisfy it structurally."""

    name: str
    formats: tuple[str, ...]  # export formats this method can write (output.formats chooses among them)
    default_formats: tuple[str, ...]  # what a run writes when output.formats is empty

    def prepare(self, components: "Components") -> None:
        """Install the method's trainable parts; everything else stays frozen."""

    def trainable_modules(self) -> list["torch.nn.Module"]:
        """Modules that receive gradients (the trainer wraps them with accelerate)."""

    def trains_text_encoder(self) -> bool:
        """Whether text-encoder outputs change during training (then they cannot be cached)."""

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups; each may carry its own 'lr'."""

    def prompt_templates(self) -> list[str] | None:
        """Templates ({token}, {class}) drawn at random per sample for images without a caption file;
        None = use the configured instance prompt."""

    def expand_prompt(self, prompt: str) -> str:
        """Rewrite a prompt before the trainer's own tokenisation (e.g. multi-vector placeholder tokens).
        Not for diffusers pipelines: they expand multi-vector tokens themselves."""

    def after_optimizer_step(self) -> None:
        """Repair anything the optimizer must not have changed."""

    def state_dict(self) -> dict[str, "torch.Tensor"]:
        """The trained state only (what a checkpoint needs to resume)."""

    def load_state_dict(self, state: dict[str, "torch.Tensor"]) -> None:
        """Inverse of state_dict."""

    def export(self, out_dir: Path, formats: list[str], metadata: dict[str, str]) -> dict[str, list[str]]:
        """Write the trained adapter in each format; return {format: [paths]}."""


class StrategyDefaults:
    """The protocol's hooks that most methods leave as no-ops; a strategy overrides what it needs."""

    @classmethod
    def formats_for(cls, config) -> tuple[str, ...]:
        """The export formats a run with this config can write (a method's settings may rule some out)."""
        return cls.formats

    def trains_text_encoder(self) -> bool:
        return False

    def fully_trained_parts(self) -> tuple[str, ...]:
        """Base models whose weights all train ('unet', 'text_encoder': every encoder): they stay float32 under
        mixed precision, where the others are cast to half precision (a model that trains only some rows, as
        textual inversion's embedding table, starts from its half-precision values)."""
        return ()

    def prompt_templates(self) -> list[str] | None:
        return None

    def expand_prompt(self, prompt: str) -> str:
        return prompt

    def after_optimizer_step(self) -> None:
        pass


_REGISTRY: dict[str, type] = {}
# Adapter-file loaders: (can_load(path) -> bool, load_into(pipe, path, scale) -> name), one per strategy module.
_LOADERS: dict[str, tuple] = {}


def register(name: str):
    """Class decorator: make a strategy available under `name`."""

    def wrap(cls):
        _REGISTRY[name] = cls
        return cls

    return wrap


def register_loader(name: str, can_load, load_into) -> None:
    """Declare how files written by strategy `name` are recognised and loaded into a pipeline."""
    _LOADERS[name] = (can_load, load_into)


def adapter_loaders() -> dict[str, tuple]:
    _load_builtin()
    return dict(_LOADERS)


def strategy_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def build_strategy(config: "RunConfig") -> Strategy:
    """Instantiate the strategy for config.method."""
    _load_builtin()
    if config.method not in _REGISTRY:
        from .. import UserError

        raise UserError(f"method '{config.method}' is not available in this build of sdft")
    return _REGISTRY[config.method](config)


def check_formats(config: "RunConfig") -> list[str]:
    """The export formats a run writes (output.formats, else the method's defaults); an unknown one is a
    UserError before anything trains, so a typo never costs a run."""
    from .. import UserError

    _load_builtin()
    cls = _REGISTRY[config.method]
    available = cls.formats_for(config)
    formats = config.output.formats or [f for f in cls.default_formats if f in available]
    unknown = [f for f in formats if f not in available]
    if unknown:
        raise UserError(f"output.formats: {', '.join(unknown)} not written by {config.method} "
                        f"(choose from {', '.join(available)})")
    return formats


def _load_builtin() -> None:
    """Import every strategy module named after a method (lazily, so `sdft --help` never loads torch)."""
    import importlib
    import importlib.util

    from ..config import METHOD_SECTIONS

    for method in METHOD_SECTIONS:
        module = f"{__package__}.{method}"
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
