"""Every benchmark, by name, in the order ``benchmarks.run`` runs them and
BENCHMARKS.md lists them. A benchmark is a module with a ``run(quick) ->
report.Result`` function; adding one is one file and one line here."""

from __future__ import annotations

from types import ModuleType

from benchmarks import decode, kernels, peers, pod, table_scaling, train

BENCHMARKS: dict[str, ModuleType] = {
    "train": train,
    "decode": decode,
    "table_scaling": table_scaling,
    "peers": peers,
    "kernels": kernels,
    "pod": pod,
}
