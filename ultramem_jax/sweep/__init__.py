"""Sweeps: scaling experiments from one YAML file, each point a train.py run
(then eval.py), run on this machine, on a Ray cluster or by a job system,
resumed by running the same command again, and reported as a table and
plots. ``python -m ultramem_jax.sweep plan|run|report FILE``; see
docs/sweeps.md.

Modules: spec.py (the sweep file), points.py (expansion, configs, names),
plan.py (inspect's counts per point), state.py (where a point stands),
execute.py (one point's processes), local.py, ray_backend.py and
print_backend.py (the backends), report.py and plots.py (the results).
"""
