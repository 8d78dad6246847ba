"""Fine-tuning methods that plug into the shared trainer."""

from .base import Strategy, build_strategy, register, strategy_names

__all__ = ["Strategy", "build_strategy", "register", "strategy_names"]
