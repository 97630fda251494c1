"""The print backend: one shell command per point not done yet, for job
systems the sweep does not drive (SLURM arrays, xpk, gcloud).

Each line is ``cd REPO && [ENV=...] python train.py ... && python eval.py
...``: the same commands the local backend runs, so a rerun resumes from
the last checkpoint. ``--template`` wraps it; its fields are ``{name}``,
``{run_dir}``, ``{index}`` (0-based, among the printed lines),
``{command}`` (the line) and ``{quoted}`` (the line quoted as one shell
word), for example::

    --template "gcloud compute tpus tpu-vm ssh my-tpu --zone us-east5-a \\
        --worker=all --command {quoted}"

The python of the commands is ``--python`` (default ``python``), the
checkout they run in ``--repo`` (default: this one). Paths inside the
checkout (configs, a sweep_dir under it) are written relative to it.
"""

from __future__ import annotations

import dataclasses
import shlex

from ultramem_jax.sweep.execute import Job

FIELDS = ("name", "run_dir", "index", "command", "quoted")


def shell_line(job: Job, python: str = "python") -> str:
  """The point's commands as one shell line."""
  env = " ".join(f"{k}={shlex.quote(v)}" for k, v in job.env)
  prefix = f"{env} " if env else ""
  home = job.repo.startswith("~/")  # left unquoted, for the remote shell to expand
  parts = ["cd " + ("~/" + shlex.quote(job.repo[2:]) if home else shlex.quote(job.repo))]
  argvs = [job.train_argv(python)] + job.eval_argvs(python)
  parts += [prefix + shlex.join(a) for a in argvs]
  return " && ".join(parts)


def check_template(template: str) -> None:
  """ValueError naming a field the template uses that does not exist."""
  try:
    template.format(**{f: "" for f in FIELDS})
  except (KeyError, IndexError, ValueError) as e:
    raise ValueError(f"--template: {template!r}: unknown or malformed field "
                     f"{e}; fields: {', '.join('{' + f + '}' for f in FIELDS)}"
                     ) from None


def print_lines(jobs: list[Job], template: str | None = None,
                python: str = "python", repo: str | None = None) -> list[str]:
  """One line per job (the template filled in, if given); `repo` is the
  checkout's path where the lines run (default: this one)."""
  out = []
  for i, job in enumerate(jobs):
    if repo:
      job = dataclasses.replace(job, repo=repo)
    line = shell_line(job, python)
    if template:
      line = template.format(name=job.name, run_dir=job.run_dir, index=i,
                             command=line, quoted=shlex.quote(line))
    out.append(line)
  return out
