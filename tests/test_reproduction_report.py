"""The RESULTS.md generator (ultramem_jax/reproduction) on made-up sweep
results: summaries, metrics and eval outputs written by hand in tmp_path
for points of small sweep files, so nothing trains. The tables, the
verdicts (numbers chosen so that each branch of the rule shows), the
"not run" sections and the PNG and CSV files are checked, and every
claim's own sweep file resolves to valid points naming its contenders."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml

from ultramem_jax.inspect import inspect_config
from ultramem_jax.reproduction import collect as C
from ultramem_jax.reproduction.__main__ import main
from ultramem_jax.reproduction.claims import CLAIMS, Claim, Part, Study
from ultramem_jax.reproduction.document import results_markdown, study_overrides
from ultramem_jax.reproduction.study_report import study_report
from ultramem_jax.sweep.points import resolve, with_overrides
from ultramem_jax.sweep.spec import read_sweep
from ultramem_jax.training.config import load_config
from tests.test_sweep_spec import REPO

STEPS = 5
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BENCH = """# Benchmarks

## decode

Some text.

### cpu: Test machine

- Command: `python -m benchmarks.run --only decode`
- JAX 0.0; 2026-12-01; the benchmark took 1 s

#### Time per decode step

| dtype | batch | MoE ms | MoE spread | UltraMemV2 ms | UltraMemV2 spread | UltraMemV2 speed-up over MoE |
|---|---:|---:|---:|---:|---:|---:|
| float32 | 8 | 300 | 5% | 75 | 4% | 4.00x |

## table_scaling
"""


def _sweep(root, name, zip_, evals, config=None):
  body = {"name": name, "sweep_dir": str(root / "runs" / name),
          "overrides": {"train.steps": STEPS, "train.eval_every": 1,
                        "optimizer.warmup_steps": 1},
          "zip": [zip_], "seeds": [0, 1], "evals": evals}
  if config:
    body["config"] = str(config)
  path = root / f"{name}.yaml"
  path.write_text(yaml.safe_dump(body, sort_keys=False))
  return path


def _finish(p, final: float, evals: dict) -> None:
  """A finished point: summary, a val/loss curve ending at `final`, evals."""
  p.run_dir.mkdir(parents=True)
  (p.run_dir / "summary.json").write_text(json.dumps(
      {"step": STEPS, "val_loss": final, "tokens_per_sec": 1000.0 + p.seed,
       "wall_time_sec": 2.0}))
  (p.run_dir / "metrics.jsonl").write_text("".join(
      json.dumps({"step": s, "val/loss": final + (STEPS - s) * 0.1}) + "\n"
      for s in range(1, STEPS + 1)))
  (p.run_dir / "eval").mkdir()
  for name, body in evals.items():
    (p.run_dir / "eval" / name).write_text(json.dumps(body))


def _fail(p) -> None:
  (p.run_dir / "sweep").mkdir(parents=True)
  (p.run_dir / "sweep" / "status.json").write_text(json.dumps(
      {"state": "failed", "exit_status": 1}))


# Per (variant, seed) final loss. moe 5.00/5.02 and V2 5.02/5.04: V2 is
# 0.02 worse, 2 x pooled std = 2 x 0.01414 = 0.0283, so parity holds
# (reproduced, a third seed due). v1 5.20/5.22 is 0.18 worse than V2
# (counts: V2 < v1 reproduced) and 0.20 worse than moe (v1 < moe: not
# reproduced). Memory+ failed twice: not run.
LOSSES = {("moe", 0): 5.00, ("moe", 1): 5.02, ("ultramem_v2", 0): 5.02,
          ("ultramem_v2", 1): 5.04, ("ultramem", 0): 5.20, ("ultramem", 1): 5.22}
# Accuracies: V2 0.60/0.62 against moe 0.40/0.42 on mqar (counts, higher
# is better: reproduced); niah 0.5/0.5 both (no spread, no difference:
# inconclusive).
ACC = {("moe", 0): 0.40, ("moe", 1): 0.42, ("ultramem_v2", 0): 0.60,
       ("ultramem_v2", 1): 0.62}
# Density: m32 4.90/4.91 against m8 5.00/5.30: pooled std
# sqrt((0.00005 + 0.045) / 2) = 0.1501, threshold 0.3002 > 0.245: inconclusive.
DENSITY = {("m8", 0): 5.00, ("m8", 1): 5.30, ("m32", 0): 4.90, ("m32", 1): 4.91}


def _tasks_json(acc: float) -> dict:
  by = [{"seq_len": 32, "n": 10, "accuracy": acc, "chance": 0.0167},
        {"seq_len": 64, "n": 10, "accuracy": acc / 2, "chance": 0.0167}]
  return {"tasks": {
      "mqar": {"overall": {"accuracy": acc, "chance": 0.0167}, "by": {"seq_len": by}},
      "niah": {"overall": {"accuracy": 0.5, "chance": 0.0167}, "by": {"seq_len": by}}}}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  root = tmp_path_factory.mktemp("repro")
  cfg = REPO / "configs"
  parity = _sweep(root, "fx_parity", {
      "variant": ["moe", "ultramem_v2", "ultramem", "memory_plus"],
      "config": [str(cfg / f"tiny_{v}.yaml") for v in
                 ("moe", "ultramem_v2", "ultramem", "memory_plus")]},
      ["loss", {"harness": {"tasks": "local_mc", "include_path": "configs/harness"}}])
  tasks = _sweep(root, "fx_tasks", {
      "variant": ["moe", "ultramem_v2"],
      "config": [str(cfg / "tiny_mqar_moe.yaml"), str(cfg / "tiny_mqar_ultramem_v2.yaml")]},
      [{"tasks": {"lengths": "32,64", "n": 10}}])
  density = _sweep(root, "fx_density", {
      "variant": ["m8", "m32"], "model.memory.top_m": [8, 32],
      "model.memory.n_keys": [128, 64]}, ["loss"], cfg / "tiny_ultramem_v2.yaml")
  missing = _sweep(root, "fx_missing", {
      "variant": ["moe", "ultramem_v2"],
      "config": [str(cfg / "tiny_moe.yaml"), str(cfg / "tiny_ultramem_v2.yaml")]}, ["loss"])
  for p in resolve(read_sweep(parity)):
    if p.variant == "memory_plus":
      _fail(p)
    else:
      loss = LOSSES[p.variant, p.seed]
      evals = {f"loss_step{STEPS}.json": {"val_loss": loss}}
      if p.variant == "moe":   # the others' harness eval is still to run
        evals[f"harness_step{STEPS}_local_mc.json"] = {
            "results": {"local_mc": {"acc,none": 0.25 + 0.125 * p.seed}}}
      _finish(p, loss, evals)
  for p in resolve(read_sweep(tasks)):
    _finish(p, 1.0, {f"tasks_step{STEPS}.json": _tasks_json(ACC[p.variant, p.seed])})
  for p in resolve(read_sweep(density)):
    loss = DENSITY[p.variant, p.seed]
    _finish(p, loss, {f"loss_step{STEPS}.json": {"val_loss": loss}})
  parity_parts = (Part("ultramem_v2", "moe", "parity"), Part("ultramem_v2", "ultramem"),
                  Part("ultramem", "moe"), Part("ultramem_v2", "memory_plus"))
  claims = (
      Claim(1, "Parity", "paper text", (
          Study(str(parity), "tiny", "loss", parity_parts),
          Study(str(missing), "bigger", "loss", parity_parts[:1],
                note="Added after the first results."))),
      Claim(3, "Tasks", "paper text", (Study(str(tasks), "tiny", "tasks", (
          Part("ultramem_v2", "moe", task="mqar"),
          Part("ultramem_v2", "moe", task="niah")), plot="tasks"),)),
      Claim(4, "Density", "paper text", (Study(str(density), "tiny", "loss", (
          Part("m32", "m8"),), plot="density"),)))
  (root / "BENCHMARKS.md").write_text(BENCH)
  out = root / "site" / "RESULTS.md"
  out.parent.mkdir()
  text, files = results_markdown(
      REPO, out, claims=claims, decode_kwargs={
          "pairs": (("tiny", "configs/tiny_moe.yaml", "configs/tiny_ultramem_v2.yaml"),),
          "batches": (1, 8), "benchmarks": root / "BENCHMARKS.md"})
  return {"root": root, "text": text, "files": files, "out": out,
          "parity": parity, "density": density}


def _line(text: str, start: str) -> str:
  return next(l for l in text.splitlines() if l.startswith(start))


def test_summary_verdicts(generated):
  t = generated["text"]
  assert ("| 1. Parity | not reproduced (from the studies that ran; not run: "
          "bigger) |") in t
  assert "| 3. Tasks | inconclusive at this scale |" in t   # mqar yes, niah no
  assert "| 4. Density | inconclusive at this scale |" in t
  assert "| 5. Memory access | reproduced |" in t


def test_loss_table_and_each_comparison(generated):
  t = generated["text"]
  s = math.sqrt(2) * 0.01   # the sample std of two seeds 0.02 apart
  # tokens 5 x 32 x 128; inspect's activated and total non-embedding
  # counts of tiny_ultramem_v2 (configs/README.md); tokens/s 1000 and 1001.
  assert _line(t, "| ultramem_v2 | 2 |") == (
      f"| ultramem_v2 | 2 | 20,480 | 886,432 | 5,025,440 | 5.0300 ± {s:.4f} | "
      "1,000 | - |")
  assert _line(t, "| memory_plus | 0 |").endswith("| s0 failed, s1 failed |")
  assert _line(t, "| ultramem_v2 <= moe |") == (
      f"| ultramem_v2 <= moe | 5.0300 (n=2) | 5.0100 (n=2) | +0.0200 | "
      f"{2 * s:.4f} | no | **reproduced** | yes |")
  assert "| -0.1800 | 0.0283 | yes |" in _line(t, "| ultramem_v2 < ultramem |")
  assert "**reproduced** | no |" in _line(t, "| ultramem_v2 < ultramem |")
  assert "**not reproduced**" in _line(t, "| ultramem < moe |")
  assert _line(t, "| ultramem_v2 < memory_plus |").endswith("| not run | - |")


def test_comparisons_in_words(generated):
  t = generated["text"]
  section = t[t.index("### tiny"):t.index("### bigger")]
  words = section[section.index("In words:"):section.index("![")].splitlines()
  # Hand-computed from LOSSES: every pair's seeds are 0.02 apart, so twice
  # the pooled std is 2 * sqrt(2) * 0.01 = 0.0283; memory_plus has no
  # finished seed and gets no sentence.
  assert [w for w in words if w.startswith("- ")] == [
      "- ultramem_v2 and moe (loss) differ by +0.0200 nats/token (ultramem_v2 "
      "5.0300, moe 5.0100), within twice the pooled seed std (0.0283): no "
      "counted difference; a third seed is due.",
      "- ultramem_v2 is better than ultramem (loss) by 0.1800 nats/token "
      "(ultramem_v2 5.0300, ultramem 5.2100; twice the pooled seed std "
      "0.0283), as the paper has it.",
      "- moe is better than ultramem (loss) by 0.2000 nats/token (ultramem "
      "5.2100, moe 5.0100; twice the pooled seed std 0.0283), against the "
      "paper, which has ultramem better than moe."]
  assert ("- ultramem_v2 is better than moe (mqar accuracy) by 0.2000 "
          "(ultramem_v2 0.6100, moe 0.4100; twice the pooled seed std 0.0283), "
          "as the paper has it.") in t
  assert "In words:" not in t[t.index("### bigger"):t.index("**Verdict, claim 1")]


def test_harness_smoke_test_line(generated):
  # moe: 0.25 and 0.375, sample std 0.125 / sqrt(2) = 0.088.
  assert ("eval.py harness, a smoke test of the pipeline and not a claim: 2 "
          "result(s) from 6 finished point(s); accuracy local_mc moe 0.312 ± "
          "0.088 (n=2).") in generated["text"]


def test_a_study_without_runs_gives_its_command(generated):
  t = generated["text"]
  section = t[t.index("### bigger"):t.index("**Verdict, claim 1")]
  assert f"python -m ultramem_jax.sweep run {generated['root']}/fx_missing.yaml" in section
  assert "**not run**: none of its 4 points has finished" in section
  assert "```\n\nAdded after the first results.\n\n**not run**" in section
  assert "Added after" not in t[:t.index("### bigger")]   # the tiny study has none
  assert "±" not in section


def test_tasks_and_density_verdicts(generated):
  t = generated["text"]
  task_rows = [l for l in t.splitlines() if l.startswith("| ultramem_v2 | 2 |")]
  assert any(f"0.610 ± {math.sqrt(2) * 0.01:.3f}" in l for l in task_rows)
  mqar = _line(t, "| ultramem_v2 > moe (mqar accuracy) |")
  assert "| +0.2000 |" in mqar and "**reproduced**" in mqar
  assert "**inconclusive at this scale**" in _line(t, "| ultramem_v2 > moe (niah accuracy) |")
  dens = _line(t, "| m32 < m8 |")
  assert "| -0.2450 | 0.3002 | no | **inconclusive at this scale** | yes |" in dens


def test_decode_section(generated):
  t = generated["text"]
  moe = inspect_config(load_config(REPO / "configs/tiny_moe.yaml", []), batches=(8,))
  v2 = inspect_config(load_config(REPO / "configs/tiny_ultramem_v2.yaml", []), batches=(8,))
  mb, vb = moe["decode"][0]["param_bytes"], v2["decode"][0]["param_bytes"]
  assert mb > vb   # 8 rows touch 64 experts' worth of a layer, V2 reads rows
  assert (f"| tiny | 8 | {mb / 1e6:,.1f} | {vb / 1e6:,.1f} | {mb / vb:.2f}x |"
          in _line(t, "| tiny | 8 |"))
  assert "cpu: Test machine: `python -m benchmarks.run --only decode`" in t
  assert "| float32 | 8 | 300 | 75 | 4.00x |" in t


def test_files_written(generated):
  site = generated["out"].parent / "results"
  names = sorted(f.name for f in generated["files"])
  assert names == sorted(["fx_parity.csv", "fx_parity_curves.csv",
                          "fx_parity_loss_curves.png", "fx_tasks.csv",
                          "fx_tasks_curves.csv", "fx_tasks_by_length.csv",
                          "fx_tasks_accuracy_by_length.png", "fx_density.csv",
                          "fx_density_curves.csv", "fx_density_loss_vs_m.png",
                          "claim5_decode_bytes.png"])
  for f in generated["files"]:
    assert f.parent == site
    if f.suffix == ".png":
      assert f.read_bytes()[:8] == PNG_MAGIC
  assert "![fx_parity](results/fx_parity_loss_curves.png)" in generated["text"]
  rows = list(csv.DictReader(open(site / "fx_parity.csv")))
  assert [r["state"] for r in rows] == ["done"] * 2 + ["trained"] * 4 + ["failed"] * 2
  assert [float(r["eval_loss"]) for r in rows[:6]] == list(LOSSES.values())


def test_the_record_stands_in_for_run_directories_that_are_gone(generated, tmp_path):
  """After the run directories are deleted, a report from the record in
  results/ gives the same rows, curves, accuracy by length and verdicts;
  without the curves' file the figure is kept as drawn, not redrawn from
  nothing; a finished record row outlives a point that is pending again,
  and a recorded point of another sweep's overrides is kept."""
  import shutil
  site = generated["out"].parent / "results"
  assets = tmp_path / "results"
  shutil.copytree(site, assets)
  root = generated["root"]
  parity = Study(str(generated["parity"]), "tiny", "loss", (Part("ultramem_v2", "moe", "parity"),))
  tasks = Study(str(root / "fx_tasks.yaml"), "tiny", "tasks",
                (Part("ultramem_v2", "moe", task="mqar"),), plot="tasks")
  stranger = dict(next(iter(csv.DictReader(open(assets / "fx_parity.csv")))),
                  name="moe-s0-00000000", eval_loss="9.5")
  with open(assets / "fx_parity.csv", "a", newline="") as f:
    csv.DictWriter(f, fieldnames=list(stranger)).writerow(stranger)
  moved = tmp_path / "gone"
  shutil.move(root / "runs", moved)
  try:
    r = C.collect(parity, REPO, assets=assets)
    # The numbers the fixture wrote: LOSSES, its curves final + (5 - step)
    # * 0.1, moe's harness accuracies; memory_plus failed, and with its
    # directory gone it is pending.
    assert [x["state"] for x in r.rows] == ["done"] * 2 + ["trained"] * 4 + ["pending"] * 2
    assert r.from_record == frozenset(x["name"] for x in r.rows[:6])
    assert [(x["variant"], x["seed"], x["eval_loss"]) for x in r.rows[:6]] == [
        (v, s, loss) for (v, s), loss in LOSSES.items()]
    for x in r.rows[:6]:
      assert r.curve[x["name"]] == pytest.approx(
          {s: LOSSES[x["variant"], x["seed"]] + (STEPS - s) * 0.1 for s in range(1, STEPS + 1)})
    assert C.harness_accuracy(r) == {"local_mc": {"moe": [0.25, 0.375]}}
    t = C.collect(tasks, REPO, assets=assets)
    assert [x["acc_mqar"] for x in t.rows] == [ACC["moe", 0], ACC["moe", 1],
                                               ACC["ultramem_v2", 0], ACC["ultramem_v2", 1]]
    assert C.accuracy_by_length(t)["mqar"] == {   # _tasks_json: acc at 32, acc / 2 at 64
        v: {32: [ACC[v, 0], ACC[v, 1]], 64: [ACC[v, 0] / 2, ACC[v, 1] / 2]}
        for v in ("moe", "ultramem_v2")}
    (assets / "fx_parity_curves.csv").unlink()
    png = assets / "fx_parity_loss_curves.png"
    before = png.read_bytes()
    out = study_report(C.collect(parity, REPO, assets=assets), assets, tmp_path, [])
    text = "\n".join(out.lines)
    assert "None of the 6 finished points has its loss curves at hand" in text
    assert "6 of the 6 finished points are read from the record" in text
    assert png.read_bytes() == before
    assert png not in out.files   # kept, not written: the report does not list it
    assert assets / "fx_parity.csv" in out.files
    assert out.parts[0].verdict.verdict == "reproduced"
    rows = list(csv.DictReader(open(assets / "fx_parity.csv")))
    assert [r["name"] for r in rows][-1] == "moe-s0-00000000"
    assert [r["state"] for r in rows][:6] == ["done"] * 2 + ["trained"] * 4
    assert [r["state"] for r in rows][6:8] == ["pending"] * 2   # memory_plus: its dir is gone
  finally:
    shutil.move(moved, root / "runs")


def test_collected_curves_and_settings(generated):
  study = Study(str(generated["parity"]), "tiny", "loss", ())
  c = C.collect(study, REPO)
  x, mean, std = C.curves(c)["ultramem"]
  # val/loss = final + (5 - step) * 0.1, final 5.20 and 5.22.
  assert list(x) == [s * 32 * 128 for s in range(1, STEPS + 1)]
  assert mean[0] == pytest.approx(5.21 + 0.4) and std[-1] == pytest.approx(0.02 / math.sqrt(2))
  assert "memory_plus" not in C.curves(c)
  d = C.collect(Study(str(generated["density"]), "tiny", "loss", ()), REPO)
  assert [C.setting(d, v, "model.memory.top_m") for v in d.variants()] == [8, 32]


def test_command_line(tmp_path, capsys):
  assert main(["commands"]) == 0
  printed = capsys.readouterr().out
  assert "python -m ultramem_jax.sweep run configs/sweeps/claim4_density.yaml" in printed
  assert main(["commands", "--at_scale"]) == 0
  assert "--sweep_dir" in capsys.readouterr().out
  # run N: the sweep tool's run of each of the claim's files, with the
  # overrides (before or after the options) and the tool's own options.
  sweep = with_overrides(read_sweep(REPO / "configs/sweeps/claim4_density.yaml"),
                         ["train.steps=7", "optimizer.warmup_steps=1"])
  names = [p.name for p in resolve(sweep)]
  assert main(["run", "4", "train.steps=7", "--sweeps_root", str(tmp_path),
               "optimizer.warmup_steps=1", "--", "--backend", "print"]) == 0
  run_names = lambda lines: [l.split("train.run_dir=")[1].split()[0].rsplit("/", 1)[1]
                              for l in lines]
  lines = capsys.readouterr().out.strip().splitlines()
  assert run_names(lines) == names
  assert all("train.steps=7" in l and "optimizer.warmup_steps=1" in l
             and f"train.run_dir={tmp_path}/claim4_density/m" in l for l in lines)
  # --missing: the points the record does not hold as finished.
  record = tmp_path / "record"
  record.mkdir()
  def recorded(done):
    with open(record / "claim4_density.csv", "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=["name", "variant", "seed", "state"])
      w.writeheader()
      for n in names:
        w.writerow({"name": n, "variant": n.split("-")[0], "seed": int(n.split("-s")[1][0]),
                    "state": "done" if n in done else "pending"})
  recorded(names[:2])
  argv = ["run", "4", "--missing", "--results", str(record), "train.steps=7",
          "--sweeps_root", str(tmp_path), "optimizer.warmup_steps=1", "--", "--backend", "print"]
  assert main(argv) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert run_names(lines) == names[2:]
  recorded(names)
  assert main(argv) == 0
  assert capsys.readouterr().out == ""
  assert main(argv + ["--only", names[0]]) == 2
  with pytest.raises(SystemExit):
    main(["report", "--out", str(tmp_path / "R.md"), "--claims", "9"])
  assert main(["report", "--out", str(tmp_path / "R.md"), "--claims", "4",
               "--sweeps_root", str(tmp_path), "model.d_model=3"]) == 2
  assert not (tmp_path / "R.md").exists()


def test_every_claim_sweep_resolves_and_names_its_contenders():
  """Each claim's sweep file, as it stands and with its at-scale overrides,
  gives valid points (as `sweep plan` checks them), the same seeds for
  every variant, 0 and 1 among them (2, the rule's fallback, where a file
  has it), and every variant a comparison names."""
  for claim in CLAIMS:
    for study in claim.studies:
      for scaled in (False, True):
        sweep = with_overrides(read_sweep(REPO / study.sweep),
                               study_overrides(study, [], scaled))
        points = resolve(sweep)
        variants = {p.variant for p in points}
        seeds = {v: sorted(p.seed for p in points if p.variant == v) for v in variants}
        first = next(iter(seeds.values()))
        assert first in ([0, 1], [0, 1, 2]), (study.sweep, seeds)
        assert all(s == first for s in seeds.values()), (study.sweep, seeds)
        for part in study.parts:
          assert {part.a, part.b} <= variants, (study.sweep, part)
        if scaled and study.at_scale:
          assert all(p.cfg.data.batch_size == 256 for p in points)
