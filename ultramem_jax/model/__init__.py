"""The decoder-only Transformer and the layers that fill its FFN slot."""

from ultramem_jax.model import moe as _moe  # noqa: F401  registers ffn kind "moe"
from ultramem_jax.model.transformer import Transformer, build_model

__all__ = ["Transformer", "build_model"]
