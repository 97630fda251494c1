"""Sweep files without training: grid and zip expansion and point names
against hand-written expectations, the refusal of a sweep with an invalid
point before anything runs, the print backend, and the report on synthetic
summaries against means and standard deviations computed by hand."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import pathlib
import socket

import pytest
import yaml

from ultramem_jax.config import ConfigError, to_dict
from ultramem_jax.inspect import inspect_config
from ultramem_jax.sweep import points as P
from ultramem_jax.sweep.__main__ import main
from ultramem_jax.sweep.execute import job_of, job_state
from ultramem_jax.sweep.print_backend import print_lines
from ultramem_jax.sweep.spec import read_sweep
from ultramem_jax.training.config import load_config

REPO = pathlib.Path(__file__).resolve().parents[1]
DENSE, MOE = REPO / "configs/tiny_dense.yaml", REPO / "configs/tiny_moe.yaml"
SHARED = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2,
          "model.ffn.inner_dim": 64, "data.tokenizer": "bytes",
          "data.seq_len": 32, "data.batch_size": 8, "optimizer.warmup_steps": 1,
          "train.steps": 5}


def write_sweep(path: pathlib.Path, **body) -> pathlib.Path:
  path.write_text(yaml.safe_dump(body, sort_keys=False))
  return path


def expected_hash(config: pathlib.Path, overrides: list[str]) -> str:
  """The name's hash as the docs define it, computed here from the config."""
  data = to_dict(load_config(config, overrides))
  del data["train"]["run_dir"], data["train"]["progress_bar"]
  text = json.dumps(data, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:8]


@pytest.fixture
def variants_file(tmp_path):
  return write_sweep(
      tmp_path / "variants.yaml", overrides=SHARED,
      zip=[{"variant": ["dense", "moe"], "config": [str(DENSE), str(MOE)]}],
      grid={"optimizer.lr": [0.001, 0.003]}, seeds=[0, 1],
      sweep_dir=str(tmp_path / "out"))


def test_zip_and_grid_expand_in_file_order_with_seeds_innermost(variants_file):
  sweep = read_sweep(variants_file)
  got = [(v["variant"], v["optimizer.lr"], v["train.seed"]) for v in P.expand(sweep)]
  assert got == [("dense", 0.001, 0), ("dense", 0.001, 1), ("dense", 0.003, 0),
                 ("dense", 0.003, 1), ("moe", 0.001, 0), ("moe", 0.001, 1),
                 ("moe", 0.003, 0), ("moe", 0.003, 1)]
  assert [v["config"] for v in P.expand(sweep)] == [str(DENSE)] * 4 + [str(MOE)] * 4


def test_point_names_and_run_dirs(variants_file, tmp_path):
  points = P.resolve(read_sweep(variants_file))
  shared = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2",
            "model.ffn.inner_dim=64", "data.tokenizer=bytes", "data.seq_len=32",
            "data.batch_size=8", "optimizer.warmup_steps=1", "train.steps=5"]
  want = []
  for variant, config in (("dense", DENSE), ("moe", MOE)):
    for lr in ("0.001", "0.003"):
      for seed in (0, 1):
        h = expected_hash(config, shared + [f"optimizer.lr={lr}",
                                            f"train.seed={seed}"])
        want.append(f"{variant}-lr{lr}-s{seed}-{h}")
  assert [p.name for p in points] == want
  assert len(set(want)) == 8
  assert [p.group for p in points[:2]] == ["dense-lr0.001"] * 2
  sweep = read_sweep(variants_file)
  for p in points:
    assert p.run_dir == tmp_path / "out" / p.name
    assert job_of(p, sweep).train[-1] == f"train.run_dir={tmp_path / 'out' / p.name}"
  assert points[5].cfg.optimizer.lr == 0.001 and points[5].cfg.train.seed == 1
  assert points[5].cfg.model.ffn.kind == "moe"


def test_names_follow_the_settings_not_the_sweep_dir(variants_file, tmp_path):
  base = [p.name for p in P.resolve(read_sweep(variants_file))]
  # Another sweep directory, and an override restating a default: same names.
  again = read_sweep(variants_file, sweep_dir=str(tmp_path / "elsewhere"))
  again = P.with_overrides(again, ["train.max_to_keep=3"])
  assert [p.name for p in P.resolve(again)] == base
  # A changed setting: every name changes, the readable part does not.
  changed = P.resolve(P.with_overrides(read_sweep(variants_file),
                                       ["optimizer.b2=0.99"]))
  assert all(a != b and a.rsplit("-", 1)[0] == b.rsplit("-", 1)[0]
             for a, b in zip(base, [p.name for p in changed]))


def test_bad_sweep_files_name_the_key(tmp_path):
  cases = [
      ({"config": str(DENSE), "zip": [{"variant": ["a", "b"],
                                        "model.d_model": [32]}]}, "zip[0]"),
      ({"config": str(DENSE), "grid": {"train.steps": [3]},
        "overrides": {"train.steps": 4}}, "train.steps"),
      ({"config": str(DENSE), "grid": {"optimizer.lr": []}}, "grid.optimizer.lr"),
      ({"config": str(DENSE), "evals": [{"loss": {"out": "x"}}]}, "evals[0].loss.out"),
      ({"config": str(DENSE), "evals": [{"loss": {"bogus": 1}}]}, "unrecognized"),
      ({"config": str(DENSE), "evals": ["generate"]}, "evals[0]"),
      ({"config": str(DENSE), "retries": -1}, "retries"),
      ({"grid": {"optimizer.lr": [0.1]}}, "config"),
      ({"config": str(DENSE), "colour": "red"}, "colour: got 'red'; unknown key"),
  ]
  for i, (body, key) in enumerate(cases):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
      read_sweep(write_sweep(tmp_path / f"bad{i}.yaml", **body))


def test_plan_and_run_refuse_an_invalid_point_before_anything_runs(tmp_path, capsys):
  out = tmp_path / "out"
  shared = {k: v for k, v in SHARED.items() if k != "model.n_heads"}
  path = write_sweep(tmp_path / "bad.yaml", config=str(DENSE), overrides=shared,
                     grid={"model.n_heads": [2, 3]}, sweep_dir=str(out))
  for command in ("plan", "run"):
    assert main([command, str(path)]) == 2
    err = capsys.readouterr().err
    assert "point 1 (tiny_dense-n_heads3" in err
    assert "model.n_heads: got 3; must divide model.d_model=32" in err
    assert not out.exists()


def test_plan_prints_inspect_counts(variants_file, capsys):
  assert main(["plan", str(variants_file)]) == 0
  text = capsys.readouterr().out
  points = P.resolve(read_sweep(variants_file))
  for p in (points[0], points[4]):
    info = inspect_config(p.cfg)
    line = next(line for line in text.splitlines() if line.startswith(p.name))
    assert f"{info['activated_params']:,}" in line and f"{info['total_params']:,}" in line
    assert " pending " in line
  assert " 1.28k " in text  # tokens: 5 steps x 8 rows x 32


def test_print_backend_one_command_per_point(variants_file):
  sweep = read_sweep(variants_file)
  points = P.resolve(sweep)
  lines = print_lines([job_of(p, sweep) for p in points[:2]],
                      "gcloud ssh --worker=all --command {quoted} # {index} {name}",
                      repo="/home/me/ultramem-jax")
  assert len(lines) == 2
  assert lines[1].endswith(f"# 1 {points[1].name}")
  # Configs inside the checkout are relative to it; the run dirs lie outside.
  assert lines[0].startswith("gcloud ssh --worker=all --command 'cd "
                             "/home/me/ultramem-jax && python train.py --config "
                             "configs/tiny_dense.yaml model.d_model=32 ")
  assert f"optimizer.lr=0.001 train.seed=0 train.run_dir={points[0].run_dir}'" in lines[0]
  plain = print_lines([job_of(points[0], sweep)])[0]
  assert plain.count(" && ") == 1 and plain.startswith(f"cd {REPO} && python train.py")


# ------------------------------------------------------------------- report


def _write_point(p, val_loss: float, evals: dict | None = None) -> None:
  """A finished point's files, made up: summary, metrics, eval outputs."""
  p.run_dir.mkdir(parents=True)
  (p.run_dir / "summary.json").write_text(json.dumps(
      {"step": p.steps, "val_loss": val_loss, "tokens_per_sec": 1.0,
       "wall_time_sec": 2.0}))
  lines = [{"step": s, "val/loss": val_loss + (p.steps - s) * 0.5}
           for s in range(1, p.steps + 1)]
  (p.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  (p.run_dir / "eval").mkdir()
  for name, body in (evals or {}).items():
    (p.run_dir / "eval" / name).write_text(json.dumps(body))


def test_report_means_stds_fits_and_unfinished_points(tmp_path, capsys):
  out = tmp_path / "out"
  path = write_sweep(
      tmp_path / "scale.yaml",
      overrides={k: v for k, v in SHARED.items() if k != "model.d_model"},
      zip=[{"variant": ["dense", "moe"], "config": [str(DENSE), str(MOE)]}],
      grid={"model.d_model": [32, 48, 64]}, seeds=[0, 1],
      evals=["loss", {"tasks": {"tasks": "mqar"}}], sweep_dir=str(out))
  points = P.resolve(read_sweep(path))
  assert len(points) == 12
  n = {p.name: inspect_config(p.cfg)["activated_params"] for p in points}
  losses = {}
  for i, p in enumerate(points):
    if p.variant == "dense":   # exactly loss = 30 * N^-0.2, seeds +-0.05
      loss = 30 * n[p.name] ** -0.2 + (0.05 if p.seed else -0.05)
    else:
      loss = 4.0 + 0.2 * p.seed   # 4.0 and 4.2
    if i in (10, 11):   # moe d_model 64: both seeds failed
      p.run_dir.mkdir(parents=True)
      (p.run_dir / "sweep").mkdir()
      (p.run_dir / "sweep" / "status.json").write_text(json.dumps(
          {"state": "failed", "exit_status": 3}))
      continue
    if i == 7:   # moe d_model 32 seed 1: running (its record names this process)
      p.run_dir.mkdir(parents=True)
      (p.run_dir / "sweep").mkdir()
      (p.run_dir / "sweep" / "status.json").write_text(json.dumps(
          {"state": "running", "pid": os.getpid(), "host": socket.gethostname()}))
      continue
    losses[p.name] = loss
    _write_point(p, loss, {
        "loss_step5.json": {"val_loss": loss + 0.001},
        "tasks_step5.json": {"tasks": {"mqar": {"overall": {
            "accuracy": 0.25 + 0.5 * p.seed}}}}})
  assert main(["report", str(path)]) == 0
  capsys.readouterr()
  report = out / "report"
  md = (report / "results.md").read_text()
  rows = {r["name"]: r for r in csv.DictReader(open(report / "results.csv"))}

  # dense d_model 32: two seeds at L -+ 0.05: mean L, sample std 0.05*sqrt(2).
  p0 = points[0]
  mean = 30 * n[p0.name] ** -0.2
  line = next(l for l in md.splitlines() if l.startswith("| dense-d_model32 |"))
  assert f"{mean:.4f} ± {0.05 * math.sqrt(2):.4f} (n=2)" in line
  # Accuracy 0.25 and 0.75: mean 0.5, std 0.25 * sqrt(2) = 0.354.
  assert "0.500 ± 0.354 (n=2)" in line
  # moe d_model 48: 4.0 and 4.2 -> 4.1000 ± 0.1414.
  line = next(l for l in md.splitlines() if l.startswith("| moe-d_model48 |"))
  assert "4.1000 ± 0.1414 (n=2)" in line
  # moe d_model 64: both failed, no number; d_model 32: one done, one running.
  line = next(l for l in md.splitlines() if l.startswith("| moe-d_model64 |"))
  assert [c.strip() for c in line.split("|")][5:8] == ["-", "-", "-"]
  assert f"{points[10].name} (failed), {points[11].name} (failed)" in line
  line = next(l for l in md.splitlines() if l.startswith("| moe-d_model32 |"))
  assert "4.0000 (n=1)" in line and f"{points[7].name} (running)" in line
  # The power law of dense is the one the losses were made from; moe's is flat.
  fit = next(l for l in md.splitlines()
             if l.startswith("Power law, final loss against activated parameters, dense"))
  a, b = fit.split("loss = ")[1].split(" * x^")
  assert float(a) == pytest.approx(30, rel=1e-3) and float(b) == pytest.approx(-0.2, abs=1e-4)
  # moe has results at 2 sizes only: no fit.
  assert not any(", moe:" in l for l in md.splitlines())

  # Every point's row; unfinished ones carry their state, never a number.
  assert rows[points[11].name]["state"] == "failed"
  assert rows[points[11].name]["val_loss"] == "" and rows[points[7].name]["val_loss"] == ""
  assert rows[points[7].name]["state"] == "running"
  assert f"| {points[11].name} | failed | failed |" in md
  assert float(rows[p0.name]["val_loss"]) == losses[p0.name]
  assert float(rows[p0.name]["eval_loss"]) == pytest.approx(losses[p0.name] + 0.001)
  assert float(rows[p0.name]["acc_mqar"]) == 0.25
  assert int(rows[p0.name]["activated_params"]) == n[p0.name]
  for name in ("loss_vs_tokens", "loss_vs_activated_params", "loss_vs_train_flops",
               "task_accuracy"):
    png = (report / f"{name}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_harness_eval_is_done_once_its_named_result_exists(tmp_path):
  """evals: harness runs `eval.py harness` with the file's options; the
  point is done once the file that command writes first exists, named by
  its tasks, shots and limit (harness_report.stem_name)."""
  harness = {"tasks": "local_mc", "include_path": "configs/harness", "limit": 3}
  path = write_sweep(tmp_path / "h.yaml", config=str(DENSE), overrides=SHARED,
                     evals=["loss", {"harness": harness}], sweep_dir=str(tmp_path / "out"))
  sweep = read_sweep(path)
  spec = sweep.evals[1]
  assert spec.args == ("--tasks", "local_mc", "--include_path", "configs/harness",
                       "--limit", "3")
  assert spec.output(5) == "harness_step5_local_mc_limit3.json"
  paper = type(spec)("harness", ("--tasks", "paper", "--num_fewshot", "0"))
  assert paper.output(7) == "harness_step7_paper_0shot.json"
  (point,) = P.resolve(sweep)
  job = job_of(point, sweep)
  assert job.evals[1] == ("harness_step5_local_mc_limit3.json",
                          ("harness", "--run_dir", str(point.run_dir), *spec.args))
  _write_point(point, 4.0, {"loss_step5.json": {"val_loss": 4.0}})
  assert job_state(job) == "trained"
  (point.run_dir / "eval" / "harness_step5_local_mc_limit3.json").write_text("{}")
  assert job_state(job) == "done"
  for bad, message in (({"tasks": "x", "taks": "x"}, "unrecognized arguments"),
                       ({"limit": 3}, "required: --tasks")):
    path.write_text(yaml.safe_dump({"config": str(DENSE), "evals": [{"harness": bad}]}))
    with pytest.raises(ConfigError, match=f"eval.py refuses it: .*{message}"):
      read_sweep(path)
