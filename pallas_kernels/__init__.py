"""Pallas kernels for product-key top-k and the weighted value read.

Each kernel sits beside its pure-JAX reference (`reference.py`) and is
tested against it in interpret mode, values and gradients:

- :func:`product_key_topk` (``product_key_topk.py``): sub-key scores and the
  rank-1 pre-filter's top-K without the token x n score matrix in memory.
- :func:`value_read` (``value_read.py``, bodies in ``value_read_tpu.py`` and
  ``value_read_triton.py``): the multi-core weighted sum of gathered value
  rows with the pre-value products fused in, forward and backward.

Backends: ``tpu`` (Mosaic, manual DMA) and ``triton`` (NVIDIA GPUs); see
``backend.py``. ``lowering.py`` lowers them for TPU on a CPU-only machine.
"""

from pallas_kernels.product_key_topk import product_key_topk
from pallas_kernels.reference import (product_key_topk_reference,
                                      value_read_reference)
from pallas_kernels.value_read import value_read

__all__ = ["product_key_topk", "product_key_topk_reference", "value_read",
           "value_read_reference"]
