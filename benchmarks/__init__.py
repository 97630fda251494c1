"""Benchmarks anyone can rerun: ``python -m benchmarks.run [--only NAME[,NAME]]
[--quick]`` runs each benchmark of ``registry.BENCHMARKS``, prints its tables
and rewrites its section of BENCHMARKS.md (one ``## <name>`` section per
benchmark, one ``### <machine kind>`` subsection per kind of machine).

The package is the top layer (tests/test_layering.py): it may import
anything of the project and nothing imports it.
"""
