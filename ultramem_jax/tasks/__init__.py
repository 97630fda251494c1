"""The memory-intensive task suite: seeded generators, solvers and scoring.

Five stand-ins for the paper's evaluation categories (see
``EVALUATION.md``): ``niah`` (long-context memorising), ``mqar`` (key-value
retrieval), ``mqar_overwrite`` (multi-round memorising), ``token_mapping``
(in-context learning) and ``fact_retrieval`` (parametric memory). Token-id
conventions are in :mod:`ultramem_jax.tasks.space`.

Typical use::

    space = TokenSpace.for_tokenizer(tokenizer)
    rows = make_rows("mqar:1,niah:0.5", n=64, seq_len=128, seed=0,
                     space=space, filler=corpus_ids)          # training
    insts = make_instances(get_task("niah", depth=0.5), 100, 1025, seed=1,
                           space=space, filler=corpus_ids)    # held out
    rows = collate(insts, 1024, space)
    correct = score(insts, argmax(model(rows.inputs)))
    table = aggregate(insts, correct, by=("depth", "length"), space=space)
"""

from ultramem_jax.tasks.base import Task
from ultramem_jax.tasks.fact_retrieval import FactRetrieval
from ultramem_jax.tasks.instance import Instance, TaskRows, collate
from ultramem_jax.tasks.mixture import (
    TaskMixture, TaskSource, make_instances, make_rows, score)
from ultramem_jax.tasks.mqar import MQAR
from ultramem_jax.tasks.mqar_overwrite import MQAROverwrite
from ultramem_jax.tasks.niah import NIAH
from ultramem_jax.tasks.registry import TASKS, get_task, parse_mixture
from ultramem_jax.tasks.sampling import Size
from ultramem_jax.tasks.scoring import aggregate, chance, exact_match
from ultramem_jax.tasks.space import (
    MARKERS, TaskError, TokenSpace, default_space)
from ultramem_jax.tasks.token_mapping import TokenMapping

__all__ = [
    "MARKERS", "Instance", "Size", "Task", "TaskError", "TaskRows",
    "TokenSpace", "aggregate", "chance", "collate", "default_space",
    "exact_match", "FactRetrieval", "TaskMixture", "TaskSource",
    "make_instances", "make_rows", "score", "MQAR", "MQAROverwrite", "NIAH",
    "TASKS", "get_task", "parse_mixture", "TokenMapping",
]
