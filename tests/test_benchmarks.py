"""The benchmarks package (``python -m benchmarks.run``): every benchmark
in ``--quick`` mode produces its table, the decode benchmark reports
``inspect``'s bytes, BENCHMARKS.md's sections are rewritten one at a time
(the rest byte for byte, atomically), and the peers benchmark says how to
install what it lacks. No speed is asserted: timings belong in the
benchmarks, not in tests."""

from __future__ import annotations

import os
import pathlib

import jax
import pytest

from benchmarks import (decode, kernels, peers, pod, run, sections, table_scaling,
                        train)
from benchmarks.registry import BENCHMARKS
from ultramem_jax.inspect import inspect_config

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
  monkeypatch.chdir(REPO)   # the benchmarks read configs/ relative paths


def _rows(result, title):
  return next(t for t in result.tables if t.title == title).rows


# ------------------------------------------------------------ each in --quick


def test_train_quick_has_a_row_per_variant_and_ratios_to_the_moe():
  r = train.run(quick=True)
  rows = _rows(r, "Train step")
  assert [row[0] for row in rows] == list(train.QUICK_VARIANTS)
  moe = rows[[row[0] for row in rows].index("MoE")]
  assert moe[5] == "1.00x" and moe[7] == "1.00x" and moe[9] == "1.00x"
  assert all(r.data[n]["memory_bytes"] > 0 and r.data[n]["tokens_per_s"] > 0
             for n in train.QUICK_VARIANTS)
  text = r.tables[0].markdown()
  assert "Ratios (stable across machines): tokens/s vs MoE" in text
  assert "Absolute (this machine only): step ms" in text


def test_decode_quick_reports_inspects_bytes():
  r = decode.run(quick=True)
  out = r.data
  assert len(out["cells"]) == len(decode.QUICK_BATCHES) * len(decode.QUICK_DTYPES)
  byte_rows = _rows(r, "Bytes per step against this machine's limit")
  for cell, row in zip(out["cells"], byte_rows):
    assert "timing" in cell and row[:2] == [cell["dtype"], str(cell["batch"])]
    for i, (name, path) in enumerate(decode.MODELS):
      cfg = decode.model_config(path, cell["dtype"], out["context"], quick=True)
      want = inspect_config(cfg, devices=1, batches=(cell["batch"],))["decode"][0]
      got = cell["bytes"][name]
      assert got["param_bytes"] == want["param_bytes"] > 0
      assert got["kv_cache_bytes"] == want["kv_cache_bytes"] > 0
      assert row[2 + i] == decode.mb(want["param_bytes"])
    # The cache at the benchmark's context, counted by hand: K and V of
    # every layer, [B, context, kv_heads, head_dim], 4-byte floats.
    m = cfg.model
    assert cell["bytes"][name]["kv_cache_bytes"] == (
        2 * m.n_layers * cell["batch"] * out["context"] * m.kv_heads
        * m.attn_head_dim * 4)
  times = _rows(r, "Time per decode step")
  assert all(row[-1].endswith("x") for row in times)
  assert any("matrix-vector" in row[0]
             for row in _rows(r, "This machine's streaming rates"))
  # Host tables: one row per batch, the three placements timed, and the
  # bytes moved as inspect counts them with table_memory=host.
  host_rows = _rows(r, "Host tables: UltraMemV2, float32")
  assert [row[0] for row in host_rows] == [str(b) for b in decode.QUICK_BATCHES]
  for cell, row in zip(out["host"], host_rows):
    assert set(cell["timing"]) == {"device", "host rows", "host sum"}
    for j, (label, extra) in enumerate(decode.HOST_VARIANTS[1:]):
      cfg = decode.model_config(decode.MODELS[1][1], "float32", out["context"],
                                quick=True, extra=extra)
      host = inspect_config(cfg, devices=1, batches=(cell["batch"],))["decode"][0]["host"]
      assert host["moved_to_device_bytes"] > 0
      assert row[-2 + j] == decode.kb(host["moved_to_device_bytes"]
                                      + host["moved_to_host_bytes"])


def test_table_scaling_quick_splits_the_step():
  r = table_scaling.run(quick=True)
  names = [row[0] for row in _rows(r, "Per program")]
  assert names == ["retrieval", "layer forward", "fwd+bwd without table",
                   "fwd+bwd", "optimizer update", "train step", "value read",
                   "table gradient"]
  steps = _rows(r, "The train step")
  assert [row[0] for row in steps] == [f"{s}x" for s in table_scaling.QUICK_SCALES]
  n0 = int(steps[0][1])
  assert [int(row[1]) for row in steps] == [
      n0 * int(s ** 0.5) for s in table_scaling.QUICK_SCALES]
  assert steps[0][4] == "1.00x"


def test_peers_without_torch_times_ours_and_says_how_to_install(monkeypatch):
  def missing():
    raise ImportError("No module named 'torch'")
  monkeypatch.setattr(peers, "_import_peer", missing)
  r = peers.run(quick=True)
  assert r.data["peer_missing"]
  rows = _rows(r, "Forward+backward of one layer")
  assert [row[0] for row in rows] == ["UltraMem v1 (ours, JAX)",
                                      "UltraMemV2 (ours, JAX)"]
  assert all(row[-1] == "n/a" for row in rows)
  line = "pip install -r benchmarks/requirements-peers.txt"
  assert any(line in n and "No module named 'torch'" in n for n in r.notes)
  assert line in r.body("cmd", {"machine": "m", "jax": "JAX", "date": "d"}, 1.0)
  assert (REPO / "benchmarks/requirements-peers.txt").read_text().split() == [
      "torch>=2.4", "ultra-mem==0.1.2"]


def test_pod_quick_compares_layouts_policies_and_mfu():
  r = pod.run(quick=True)
  assert [t.title for t in r.tables] == [
      "Scanned layers (4 blocks)",
      "Peak memory of the train step by remat policy (scanned, 4 blocks)",
      "Model FLOPs utilisation of the tiny configs"]
  scan = r.data["scan"]["UltraMemV2"]
  assert set(scan["compile_s"]) == {"unrolled", "scanned"}
  remat = r.data["remat"]
  none, full = remat[("UltraMemV2", "none")], remat[("UltraMemV2", "full")]
  # Scanned blocks under full remat keep only each block's input.
  assert full["xla_peak"] < none["xla_peak"]
  assert 0.75 <= none["estimate"] / none["xla_peak"] <= 1.25
  mfu = r.data["mfu"]
  assert mfu["peak_tflops"] > 0 and 0 < mfu["dense"]["mfu"]


def test_kernels_on_cpu_is_skipped_with_a_line():
  if jax.devices()[0].platform != "cpu":
    pytest.skip("runs the kernels on an accelerator")
  r = kernels.run(quick=True)
  assert r.tables == [] and "no accelerator" in r.skipped


def test_run_writes_only_the_named_sections(tmp_path):
  out = tmp_path / "B.md"
  out.write_text("# Benchmarks\n\nintro\n\n## other\n\nkept  \n")
  assert run.main(["--quick", "--only", "kernels", "--out", str(out)]) == 0
  text = out.read_text()
  assert text.startswith("# Benchmarks\n\nintro\n\n## other\n\nkept  \n\n## kernels\n")
  assert f"### {run.machine.machine_kind()}\n" in text
  assert "- Command: `python -m benchmarks.run --quick --only kernels --out" in text
  with pytest.raises(SystemExit):
    run.parse_args(["--only", "train,nope"])
  assert run.parse_args([]).names == list(BENCHMARKS)
  assert run.parse_args(["--quick"]).out is None
  # A run that measured nothing (kernels on a CPU) keeps what is there.
  if not jax.devices()[0].platform == "cpu":
    return
  kept = text.replace("no accelerator (JAX runs on CPU)", "kept figures")
  out.write_text(kept)
  assert run.main(["--quick", "--only", "kernels", "--out", str(out)]) == 0
  assert out.read_text() == kept
  assert sections.has_subsection(kept, "kernels", run.machine.machine_kind())
  assert not sections.has_subsection(kept, "other", run.machine.machine_kind())


# ------------------------------------------------------- section rewriting

OLD = ("# Benchmarks\n\nIntro.\n\n## alpha\n\nA's preamble.\n\n### cpu: X\n\n"
       "a cpu\n```\n## not a heading\n### nor this\n```\n\n### gpu: H\n\n"
       "a gpu   \n\n\n## beta\n\nB.\n\n### cpu: X\n\nold b\n\n## gamma\n"
       "no blank line at the end")


def _section(text: str, name: str) -> str:
  """Section `name` as it stands in `text`, up to the next '## '."""
  start = text.index(f"## {name}\n")
  nxt = text.find("\n## ", start + 1)
  return text[start:] if nxt < 0 else text[start:nxt + 1]


def test_rewriting_one_section_leaves_the_others_byte_identical():
  new = sections.rewrite_section(OLD, "beta", "B again.", "cpu: X", "new b\n")
  assert new.startswith(OLD[:OLD.index("## beta")])
  assert _section(new, "gamma") == _section(OLD, "gamma")
  assert new.endswith("no blank line at the end")
  assert _section(new, "beta") == (
      "## beta\n\nB again.\n\n### cpu: X\n\nnew b\n\n"
      f"### {sections.PLACEHOLDER}\n\n{sections.placeholder_body('beta')}\n")
  # Rewriting again with the same content changes nothing.
  assert sections.rewrite_section(new, "beta", "B again.", "cpu: X",
                                  "new b\n") == new


def test_a_cpu_run_keeps_the_accelerator_and_code_fences():
  new = sections.rewrite_section(OLD, "alpha", "A2.", "cpu: X", "a cpu 2\n")
  alpha = _section(new, "alpha")
  assert "### gpu: H\n\na gpu   \n" in alpha and "a cpu 2" in alpha
  assert "## not a heading" not in alpha          # that subsection was replaced
  assert sections.PLACEHOLDER not in alpha        # an accelerator is there
  assert new[new.index("## beta"):] == OLD[OLD.index("## beta"):]
  # Another CPU model gets its own subsection, after the first.
  other = sections.rewrite_section(new, "alpha", "A2.", "cpu: Y", "y\n")
  assert _section(other, "alpha").index("### cpu: X") < \
      _section(other, "alpha").index("### cpu: Y") < \
      _section(other, "alpha").index("### gpu: H")


def test_an_accelerator_run_replaces_the_placeholder_and_a_new_section_is_appended():
  text = sections.rewrite_section(OLD, "delta", "D.", "cpu: X", "d cpu\n")
  assert text.startswith(OLD) or text.startswith(OLD + "\n")
  assert sections.PLACEHOLDER in _section(text, "delta")
  text2 = sections.rewrite_section(text, "delta", "D.", "gpu: NVIDIA H200",
                                   "d gpu\n")
  delta = _section(text2, "delta")
  assert sections.PLACEHOLDER not in delta
  assert delta.index("### cpu: X") < delta.index("### gpu: NVIDIA H200")
  assert text2[:text2.index("## delta")] == text[:text.index("## delta")]


def test_the_file_is_replaced_atomically(tmp_path, monkeypatch):
  path = tmp_path / "BENCHMARKS.md"
  path.write_text(OLD)

  def fail(src, dst):
    assert pathlib.Path(src).read_text().startswith("# Benchmarks")
    raise OSError("disk full")
  monkeypatch.setattr(os, "replace", fail)
  with pytest.raises(OSError, match="disk full"):
    sections.update_file(path, "beta", "B.", "cpu: X", "b\n")
  assert path.read_text() == OLD
  assert sorted(p.name for p in tmp_path.iterdir()) == ["BENCHMARKS.md"]
  monkeypatch.undo()
  sections.update_file(path, "beta", "B.", "cpu: X", "b\n")
  assert "\nb\n" in path.read_text()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["BENCHMARKS.md"]
