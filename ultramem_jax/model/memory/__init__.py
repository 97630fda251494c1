"""Product-key memory layers: retrieval (steps 1-5), values (step 6), the
module (layer.py) and the paper's initialisation (init.py)."""

from ultramem_jax.model.memory.init import calibrate_memory
from ultramem_jax.model.memory.layer import (MemoryBuffer, MemoryLayer,
                                             MemoryStat, MemoryTable,
                                             memory_layers, memory_utilisation,
                                             refresh_memory)

__all__ = ["MemoryBuffer", "MemoryLayer", "MemoryStat", "MemoryTable",
           "calibrate_memory", "memory_layers", "memory_utilisation",
           "refresh_memory"]
