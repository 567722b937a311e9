"""Flash Attention CUTE stand-in (tests only): mirrors upstream `flash_attn/cute/__init__.py` (exports)."""

__version__ = "4.0.0b27+cpu-stand-in"

from .interface import flash_attn_func, flash_attn_varlen_func  # noqa: E402,F401

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]
