"""Where independent tasks run: this process, local worker processes, or a Ray cluster.

Some of the work is embarrassingly parallel: the compiles of ``oamipc pareto`` (one per budget)
are independent, and so are the MIP's class problems and layer sub-problems.  An
:class:`Executor` maps one module-level function over a list of items, with one large argument
shared by every task, and returns the results in the items' order, so the answer does not depend
on how many workers ran it or in which order they finished.

* ``local`` (the default): with one worker the tasks run here, one after another; with more, in
  spawned worker processes (fork and a torch that has started threads do not mix), one torch
  thread each.  The shared argument is pickled once per task.
* ``ray``: tasks are Ray tasks of one CPU each.  Without an address an embedded local Ray is
  started with ``workers`` CPUs and shut down afterwards (always a new one: a cluster that
  ``ray start`` runs on this machine, or ``RAY_ADDRESS``, is joined only when named); with an
  address (``ray://...`` or ``host:port`` of a running cluster, or ``auto``) the tasks join that
  cluster, which is left running.  The shared argument goes to the object store once (``ray.put``) and every task reads
  it from there.  The embedded Ray's workers import this very ``oamipc`` (its directory is put on
  their ``PYTHONPATH``); a cluster's nodes need oamipc installed.

Ctrl-C (``KeyboardInterrupt``) with ``ray``: the tasks still running are cancelled (their worker
processes killed) before it is re-raised, so a joined cluster stays up with none of this
driver's work left on it.  An embedded Ray is then shut down, and any of its processes still
alive after that are killed: a Ctrl-C while Ray is starting (or one that reaches Ray's own
processes from the terminal) can stop its raylet before the agents the raylet started, and
those agents then hang instead of exiting.  They are found by an environment variable
(:data:`OWNER_ENV`) that every process of the embedded Ray inherits (Linux: ``/proc``).

Ray is an optional dependency (``pip install 'oamipc[ray]'``); asking for it without it
installed is a usage error that says how to install it.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import logging
import multiprocessing
import os
import signal
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from oamipc.errors import UsageError

log = logging.getLogger(__name__)

S = TypeVar("S")
T = TypeVar("T")
R = TypeVar("R")

EXECUTORS = ("local", "ray")
RAY_INSTALL = "pip install 'oamipc[ray]' (or: pip install ray)"
OWNER_ENV = "OAMIPC_RAY_OWNER"  # in every process of an embedded Ray: a token naming the driver that started it


class Executor(Protocol):
    """Maps ``fn(shared, item)`` over ``items``; results in the items' order."""

    name: str
    workers: int

    def map(self, fn: Callable[[S, T], R], shared: S, items: Sequence[T],
            done: Callable[[int], None] | None = None) -> list[R]:
        """Run every task; ``done(n)`` after each finished task (``n`` finished so far)."""
        ...


def _single_thread_call(fn: Callable[[S, T], R], shared: S, item: T) -> R:
    """A task in a worker process: one torch thread, so that workers do not fight over cores."""
    import torch

    torch.set_num_threads(1)
    return fn(shared, item)


class LocalExecutor:
    """This process (one worker) or spawned local worker processes."""

    name = "local"

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers

    def map(self, fn: Callable[[S, T], R], shared: S, items: Sequence[T],
            done: Callable[[int], None] | None = None) -> list[R]:
        if self.workers <= 1 or len(items) <= 1:
            results = []
            for i, item in enumerate(items):
                results.append(fn(shared, item))
                if done:
                    done(i + 1)
            return results
        ctx = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(max_workers=min(self.workers, len(items)), mp_context=ctx) as pool:
            running = [pool.submit(_single_thread_call, fn, shared, item) for item in items]
            try:
                for n, _ in enumerate(futures.as_completed(running), 1):
                    if done:
                        done(n)
            except BaseException:
                for fut in running:
                    fut.cancel()
                raise
            return [fut.result() for fut in running]


class RayExecutor:
    """Ray tasks of one CPU each, on an embedded local Ray or a running cluster."""

    name = "ray"

    def __init__(self, ray: Any, workers: int, address: str | None) -> None:
        self.ray = ray
        self.workers = workers
        self.address = address

    def map(self, fn: Callable[[S, T], R], shared: S, items: Sequence[T],
            done: Callable[[int], None] | None = None) -> list[R]:
        ray = self.ray
        remote = ray.remote(num_cpus=1, max_retries=0)(_single_thread_call)
        shared_ref = ray.put(shared)  # once into the object store; a top-level ref arrives resolved
        refs = [remote.remote(fn, shared_ref, item) for item in items]
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                if done:
                    done(len(refs) - len(pending))
            return list(ray.get(refs))
        except BaseException:  # Ctrl-C or a failed task: stop what is still running
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            raise


def require_ray() -> Any:
    """The ``ray`` module; a usage error that says how to install it when it is missing."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"--executor ray needs Ray, which is not installed: {RAY_INSTALL}") from None
    return ray


@contextlib.contextmanager
def executor(kind: str = "local", workers: int = 1, address: str | None = None) -> Iterator[Executor]:
    """An executor of ``kind`` (``local`` or ``ray``) for the duration of the ``with`` block."""
    if kind not in EXECUTORS:
        raise UsageError(f"--executor {kind!r}: use one of {', '.join(EXECUTORS)}")
    if workers < 1:
        raise UsageError(f"--workers must be 1 or more, got {workers}")
    if address is not None and kind != "ray":
        raise UsageError("--ray-address needs --executor ray")
    if kind == "local":
        yield LocalExecutor(workers)
        return
    ray = require_ray()
    if ray.is_initialized():  # the caller's own Ray: use it, leave it as it is
        yield RayExecutor(ray, workers, address)
        return
    if address is None:
        with _embedded_ray(ray, workers):
            yield RayExecutor(ray, workers, address)
        return
    log.info("joining the Ray cluster at %s", address)
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UsageError(f"--ray-address {address}: cannot join a Ray cluster there ({exc}); start one "
                         "with `ray start --head` or drop --ray-address for an embedded one") from None
    try:
        yield RayExecutor(ray, workers, address)
    finally:
        ray.shutdown()  # only disconnects: the cluster keeps running


@contextlib.contextmanager
def _embedded_ray(ray: Any, workers: int) -> Iterator[None]:
    """A local Ray with ``workers`` CPUs for the ``with`` block; none of its processes outlive it."""
    token = f"{os.getpid()}-{uuid.uuid4().hex}"
    package_root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    log.info("starting an embedded local Ray with %d CPU(s)", workers)
    saved = os.environ.get(OWNER_ENV)
    os.environ[OWNER_ENV] = token  # inherited by the processes ray.init starts, and by theirs
    try:
        try:
            # address="local": a Ray of our own even where `ray start` left a cluster (or RAY_ADDRESS)
            # that a plain ray.init() would join, with num_cpus refused
            ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING, runtime_env={"env_vars": {"PYTHONPATH": path}})
        finally:
            if saved is None:
                os.environ.pop(OWNER_ENV, None)
            else:
                os.environ[OWNER_ENV] = saved
        yield
    finally:
        try:
            if ray.is_initialized():
                ray.shutdown()
        finally:
            if left := kill_marked(token):
                log.info("killed %d process(es) the embedded Ray left behind", left)


def kill_marked(token: str) -> int:
    """Kill (SIGKILL) every other process whose environment has ``OAMIPC_RAY_OWNER=token``; how many.

    Reads ``/proc``, so it finds them on Linux only; elsewhere it does nothing.  A process of
    another user, or one that exits meanwhile, is skipped.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        return 0
    entry = f"{OWNER_ENV}={token}".encode()
    killed = 0
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
            continue
        try:
            marked = entry in (pid_dir / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marked:
            with contextlib.suppress(OSError):
                os.kill(int(pid_dir.name), signal.SIGKILL)
                killed += 1
    return killed
