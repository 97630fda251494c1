"""Train a model: python train.py --config configs/tiny_dense.yaml [key=value ...]

Several processes (one per host of a TPU pod slice or GPU cluster, or
several on one machine) train one model together: run the same command on
every host with --distributed where JAX detects the cluster (Cloud TPU pod
slice, SLURM, Open MPI), or give each process --coordinator HOST:PORT
--num_processes N --process_id I. train.run_dir must be one directory that
every process sees (a shared filesystem).

Exit status: 0 when training finished or was stopped by SIGTERM/SIGINT
(with a checkpoint saved; run the same command to resume), 2 for a bad
config, bad arguments or bad data, or a train.run_dir in use by another
training (nothing was trained), 3 when training diverged, 4 when another
process of a multi-process run failed (its message is printed; every
process stops within --failure_timeout), 5 when a checkpoint did not fit on
the disk (the earlier checkpoints are intact: free some space and run the
same command to resume), 128 + the signal's number (143 for SIGTERM) when
SIGTERM/SIGINT arrived while the run was checked and its data prepared
(nothing was trained or written), 1 for an unexpected error (in a
multi-process run the others then stop with 4). A SIGTERM/SIGINT to one
process of a multi-process run stops all of them after the same step, with
one checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from ultramem_jax.config import ConfigError
from ultramem_jax.data.corpora import DataError
from ultramem_jax.parallel import distributed, failure
from ultramem_jax.training.checkpoint import CheckpointDiskFull
from ultramem_jax.training.config import load_config
from ultramem_jax.training.health import Diverged
from ultramem_jax.training.signals import StoppedBeforeTraining
from ultramem_jax.training.trainer import train


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Overrides are dotted config keys, e.g. optimizer.lr=1e-3 train.steps=200")
  parser.add_argument("--config", required=True, help="YAML config file")
  parser.add_argument("overrides", nargs="*", help="dotted.key=value")
  group = parser.add_argument_group(
      "multi-process runs", "one process per host; every process gets the "
      "same config and overrides")
  group.add_argument("--distributed", action="store_true",
                     help="join a multi-process run whose processes JAX detects "
                     "(Cloud TPU pod slice, SLURM, Open MPI): the same command "
                     "on every host")
  group.add_argument("--coordinator", metavar="HOST:PORT",
                     help="address of process 0, the same for every process")
  group.add_argument("--num_processes", type=int, metavar="N",
                     help="number of processes in the run")
  group.add_argument("--process_id", type=int, metavar="I",
                     help="this process's index, 0..N-1")
  group.add_argument("--failure_timeout", type=float, default=60.0,
                     metavar="SECONDS",
                     help="a process silent this long is taken for dead and "
                     "every process stops (default 60)")
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  try:
    cfg = load_config(args.config, args.overrides)
    # The distributed runtime starts only after the config checks.
    launch = distributed.Launch(args.distributed, args.coordinator,
                                args.num_processes, args.process_id,
                                args.failure_timeout)
    problem = distributed.launch_error(launch)
    if problem:
      parser.error(problem)  # exits with status 2
    if launch.enabled:  # before anything touches a JAX device
      distributed.initialize(launch)
      failure.watch(launch.failure_timeout)
      print(distributed.describe(), flush=True)
  except (ConfigError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    train(cfg)
  except (ConfigError, DataError) as e:
    return failure.stop_all(f"error: {e}", 2)
  except Diverged as e:
    return failure.stop_all(f"error: {e}", 3)
  except CheckpointDiskFull as e:
    return failure.stop_all(f"error: {e.strerror}", 5)
  except StoppedBeforeTraining as e:
    return failure.stop_all(str(e), e.exit_status)
  except Exception as e:
    if not failure.active():
      raise
    failure.stop_after_error(e)  # tells the others; does not return
  return 0


if __name__ == "__main__":
  sys.exit(main())
