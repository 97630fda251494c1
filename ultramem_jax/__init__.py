"""ultramem-jax: UltraMemV2 and its peers in JAX/Flax NNX."""

__version__ = "0.1.0"
