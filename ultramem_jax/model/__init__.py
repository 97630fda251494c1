"""The decoder-only Transformer and the layers that fill its FFN slot."""

from ultramem_jax.model.transformer import Transformer, build_model

__all__ = ["Transformer", "build_model"]
