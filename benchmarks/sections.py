"""Rewriting one benchmark's part of BENCHMARKS.md, leaving the rest of the
file byte for byte as it was.

The file is a title and preamble, then one ``## <benchmark>`` section per
benchmark: a preamble (what it measures) and one ``### <machine kind>``
subsection per kind of machine (``### cpu: <model>``, ``### gpu: NVIDIA
H200``), so a CPU run never erases an accelerator's results. Until an
accelerator's subsection exists, a section holds the placeholder
``### accelerator: not measured`` saying how to produce one; an
accelerator's run replaces it. Headings inside fenced code do not count.
The new file is written beside the old one and renamed over it (atomic on
POSIX): a failed run leaves the old file whole.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

PLACEHOLDER = "accelerator: not measured"
TITLE = "# Benchmarks\n"


def placeholder_body(name: str) -> str:
  return (f"No accelerator was available when this section was written, so "
          f"nothing here is measured on one. On a machine with a GPU or TPU, "
          f"run `python -m benchmarks.run --only {name}` (or "
          f"`python -m benchmarks.run` for every section); it adds a "
          f"subsection named after the device and removes this one.\n")


def _blocks(lines: list[str], marker: str) -> list[list[str]]:
  """`lines` (with their ends) cut before every line starting with
  `marker` outside fenced code; the first block is what precedes the first
  such line (possibly empty)."""
  blocks: list[list[str]] = [[]]
  fenced = False
  for line in lines:
    if line.lstrip().startswith("```"):
      fenced = not fenced
    if not fenced and line.startswith(marker):
      blocks.append([])
    blocks[-1].append(line)
  return blocks


def _heading(block: list[str], marker: str) -> str:
  return block[0][len(marker):].strip() if block else ""


def _ensure_end(lines: list[str]) -> list[str]:
  """A block that ends in a blank line, so the next heading stands apart."""
  text = "".join(lines).rstrip("\n")
  return [text + "\n\n"] if text else []


def is_accelerator(kind: str) -> bool:
  return not kind.startswith("cpu") and kind != PLACEHOLDER


def rewrite_section(text: str, name: str, preamble: str, kind: str,
                    body: str) -> str:
  """`text` with section ``## name``'s preamble set to `preamble` and its
  subsection ``### kind`` set to `body` (added when missing: a CPU's after
  the other CPU subsections, an accelerator's after the other accelerators',
  replacing the placeholder). Every other section is returned unchanged,
  byte for byte; a new section goes at the end."""
  if not text.strip():
    text = TITLE
  sections = _blocks(text.splitlines(keepends=True), "## ")
  head, rest = sections[0], sections[1:]
  found = [i for i, s in enumerate(rest) if _heading(s, "## ") == name]
  old = rest[found[0]] if found else [f"## {name}\n"]
  subs = [(_heading(s, "### "), s) for s in _blocks(old[1:], "### ")[1:]]
  new = (kind, [f"### {kind}\n", "\n", body])
  names = [k for k, _ in subs]
  if kind in names:
    subs[names.index(kind)] = new
  else:
    group = is_accelerator(kind)
    last = max((i for i, (k, _) in enumerate(subs)
                if k != PLACEHOLDER and is_accelerator(k) == group), default=None)
    if last is None:
      last = -1 if not group else max(
          (i for i, (k, _) in enumerate(subs) if k != PLACEHOLDER), default=-1)
    subs.insert(last + 1, new)
  if is_accelerator(kind):
    subs = [(k, s) for k, s in subs if k != PLACEHOLDER]
  elif not any(is_accelerator(k) or k == PLACEHOLDER for k, _ in subs):
    subs.append((PLACEHOLDER, [f"### {PLACEHOLDER}\n", "\n",
                               placeholder_body(name)]))
  parts = [old[0], "\n", *_ensure_end([preamble])]
  parts += [line for _, s in subs for line in _ensure_end(s)]
  section = "".join(parts).rstrip("\n") + "\n"
  if found:
    i = found[0]
    rest[i] = [section + ("\n" if i + 1 < len(rest) else "")]
  else:
    if rest:
      rest[-1] = _ensure_end(rest[-1])
    else:
      head = _ensure_end(head)
    rest.append([section])
  return "".join(line for block in [head, *rest] for line in block)


def has_subsection(text: str, name: str, kind: str) -> bool:
  """Whether section ``## name`` of `text` has a ``### kind`` subsection."""
  for block in _blocks(text.splitlines(keepends=True), "## ")[1:]:
    if _heading(block, "## ") == name:
      return any(_heading(s, "### ") == kind
                 for s in _blocks(block[1:], "### ")[1:])
  return False


def write_atomic(path: pathlib.Path, text: str) -> None:
  """Writes `text` to a temporary file in `path`'s folder, then renames it
  over `path`; on any failure the temporary file is removed and `path` is
  as it was."""
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    if path.exists():
      os.chmod(tmp, path.stat().st_mode & 0o777)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def update_file(path: pathlib.Path, name: str, preamble: str, kind: str,
                body: str) -> None:
  """Rewrites section `name` of the file at `path` (created if missing)."""
  path = pathlib.Path(path)
  text = path.read_text() if path.exists() else TITLE
  write_atomic(path, rewrite_section(text, name, preamble, kind, body))
