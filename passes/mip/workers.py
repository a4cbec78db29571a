"""Forked worker processes for independent MILP solves (``--jobs N``).

Who uses it: the paper formulation's class problems (:mod:`.paper`), and the joint stage's
speculative trust radii (:mod:`.joint`).  Both map one function over ``n`` independent
tasks that read a large shared state (the traced network, the unit graph, flip effects).

Why fork and a module global: fx GraphModules do not pickle reliably, so the shared state is
not sent to the workers; it is set here just before the pool forks and inherited.  Only the task
index goes in and the (small, picklable) result comes back.  Each worker first resets HiGHS's
inherited scheduler (:func:`oamipc.solver.reset_after_fork`; without it a worker forked after
the parent solved waits forever) and uses one torch thread.  Where the platform has no fork, or
with ``jobs <= 1``, the tasks run one after another in this process: the results are the same.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

import torch

from oamipc.solver import reset_after_fork

S = TypeVar("S")
R = TypeVar("R")

_SHARED: Any = None  # the state the forked workers inherit


def _run(task: tuple[Callable[[Any, int], Any], int]) -> Any:
    fn, index = task
    reset_after_fork()
    torch.set_num_threads(1)
    return fn(_SHARED, index)


def fork_map(fn: Callable[[S, int], R], shared: S, n: int, jobs: int) -> Iterator[R]:
    """``fn(shared, i)`` for ``i`` in ``range(n)``, in order, in up to ``jobs`` forked workers.

    ``fn`` must be a module-level function (it is pickled by name); ``shared`` is not pickled.
    """
    if jobs <= 1 or n <= 1 or not hasattr(os, "fork"):
        for i in range(n):
            yield fn(shared, i)
        return
    global _SHARED
    _SHARED = shared
    try:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=min(jobs, n), mp_context=ctx) as pool:
            yield from pool.map(_run, [(fn, i) for i in range(n)])
    finally:
        _SHARED = None
