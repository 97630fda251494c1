"""The paper's claims, reproduced at the scale a machine allows: the
verdict rule (``verdict.py``), the claims and their sweep files
(``claims.py``) and the RESULTS.md generator (``python -m
ultramem_jax.reproduction report``; docs/reproduction.md)."""
