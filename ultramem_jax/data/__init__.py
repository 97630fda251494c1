"""Corpora, tokenizers, packing and the grain input pipeline."""
