"""The user's own text: plain text files, JSON-lines files and directories of
them, decoded as UTF-8 with the place of any bad byte named; and the error
every data source raises."""

from __future__ import annotations

import json
import pathlib

# Suffixes read from a directory, matched in any case (NOTES.TXT is read).
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".jsonl")


class DataError(ValueError):
  """A data source could not be fetched or read; the message says which and why."""


class DecodeError(DataError):
  """Bytes that are not valid UTF-8; the message names the place and offset."""


def decode(data: bytes, where: str) -> str:
  try:
    return data.decode("utf-8").removeprefix("\ufeff")
  except UnicodeDecodeError as e:
    raise DecodeError(f"{where}: not valid UTF-8 at byte offset {e.start} ({e.reason})") from None


def _read_text_file(path: pathlib.Path) -> list[str]:
  return [decode(path.read_bytes(), str(path))]


def read_jsonl(path: pathlib.Path, text_field: str) -> list[str]:
  docs = []
  for lineno, line in enumerate(decode(path.read_bytes(), str(path)).split("\n"), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg}); expected an object "
              f"with a string field {text_field!r}") from None
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
      raise DataError(f"{path}, line {lineno}: expected a JSON object with a string field {text_field!r}")
    docs.append(record[text_field])
  return docs


def read_path(path: pathlib.Path, text_field: str,
               skipped: list[str] | None = None) -> list[str]:
  """Documents under `path`. With a `skipped` list, files that are not
  valid UTF-8 are left out and described there instead of raising."""
  if path.is_dir():
    files = sorted((p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file()),
           key=lambda p: p.relative_to(path).parts)
    return [doc for f in files for doc in read_path(f, text_field, skipped)]
  if path.suffix.lower() == ".json":
    raise DataError(f"{path}: a .json file is not read as text; use JSON lines (.jsonl, one object per line "
            f"with a string field {text_field!r}) or rename it to .txt")
  try:
    return read_jsonl(path, text_field) if path.suffix.lower() == ".jsonl" else _read_text_file(path)
  except DecodeError as e:
    if skipped is None:
      raise
    skipped.append(str(e))
    return []
