"""What a benchmark returns (a :class:`Result` of :class:`Table` s) and its
markdown: the printed tables and the ``### <machine kind>`` subsection
written to BENCHMARKS.md."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Table:
  """One markdown table. `kinds` says, per column after the first, whether
  it is "ratio" (stable across machines), "absolute" (valid for this
  machine only) or "" (a setting or a count); the rendered table says so
  below itself."""
  title: str
  header: list[str]
  rows: list[list[str]]
  kinds: list[str]
  notes: list[str] = dataclasses.field(default_factory=list)

  def markdown(self) -> str:
    lines = [f"#### {self.title}", "",
             "| " + " | ".join(self.header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(self.header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in self.rows]
    kinds = dict(ratio=[], absolute=[])
    for name, kind in zip(self.header[1:], self.kinds):
      if kind in kinds:
        kinds[kind].append(name)
    said = []
    if kinds["ratio"]:
      said.append("ratios (stable across machines): " + ", ".join(kinds["ratio"]))
    if kinds["absolute"]:
      said.append("absolute (this machine only): " + ", ".join(kinds["absolute"]))
    lines += ["", *[f"{s[0].upper()}{s[1:]}." for s in said]] if said else []
    lines += ["", *self.notes] if self.notes else []
    return "\n".join(lines)


@dataclasses.dataclass
class Result:
  """One benchmark's run. `description` is the section's preamble (what it
  measures and how); `setup` the run's settings (bullets of its
  subsection); `skipped` a line saying why nothing was measured; `data`
  the raw figures (for tests and other tools)."""
  name: str
  description: str
  setup: list[str] = dataclasses.field(default_factory=list)
  tables: list[Table] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)
  skipped: str | None = None
  data: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def measured(self) -> bool:
    """False when nothing was measured (skipped, or every case skipped:
    ``data["nothing_measured"]``)."""
    return not self.skipped and not self.data.get("nothing_measured")

  def body(self, command: str, machine: dict[str, str], wall_s: float) -> str:
    """The subsection's text below its heading."""
    lines = [f"- Command: `{command}`",
             f"- Machine: {machine['machine']}",
             f"- {machine['jax']}; {machine['date']}; the benchmark took "
             f"{wall_s:,.0f} s; {machine.get('load', 'load average unknown')} "
             "when the run started"]
    lines += [f"- {s}" for s in self.setup]
    if self.skipped:
      lines += ["", f"**Skipped: {self.skipped}**"]
    for table in self.tables:
      lines += ["", table.markdown()]
    if self.notes:
      lines += ["", *self.notes]
    return "\n".join(lines) + "\n"

  def printed(self) -> str:
    """What the terminal shows: the tables and notes."""
    parts = [f"== {self.name} =="]
    if self.skipped:
      parts.append(f"skipped: {self.skipped}")
    parts += [t.markdown() for t in self.tables]
    parts += self.notes
    return "\n\n".join(parts)
