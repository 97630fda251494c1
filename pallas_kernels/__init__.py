"""Pallas kernels for product-key top-k and the weighted value read.

Filled by the kernels issue: each kernel sits beside a pure-JAX reference in
`reference.py` that it is tested against. Nothing here is imported by the
model yet; the memory layers call the pure-JAX path.
"""
