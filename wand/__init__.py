"""WAND: windowed attention + knowledge distillation for autoregressive TTS (plain torch + transformers).

This package never imports ray or mlflow: it is the method; ``pipeline/`` runs it at scale.
"""

from .cache import WandCache
from .generate import generate
from .masks import wand_mask
from .patch import disable_wand, enable_wand, is_enabled

__all__ = ["WandCache", "disable_wand", "enable_wand", "generate", "is_enabled", "wand_mask"]
__version__ = "0.1.0"
