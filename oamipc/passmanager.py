"""Pass infrastructure: analyses, transforms, a cached analysis manager and a pass manager.

Design (after onnx-ir's pass API, Pythran's analysis caching and LLVM's "preserved analyses"):

* An :class:`Analysis` computes facts about a GraphModule (unit groups, costs, scores, a plan)
  and never changes it.  Analyses are frozen dataclasses whose fields are their options, so an
  analysis *instance* is a hashable cache key: ``am.get(L1Importance())`` runs once per graph
  state and is served from the cache afterwards.
* A :class:`Pass` (a transform) changes the GraphModule and returns :class:`PassResult`.  Its
  ``preserves`` names the analysis classes whose results stay valid; every other cached result
  is dropped when the pass reports ``modified=True``.
* :class:`PassManager` runs passes in order; after a modifying pass it lints and recompiles the
  graph and re-propagates shapes (``verify=True``).  An error inside a pass is re-raised with the
  pass's name and the passes that ran before it.
* A registry maps CLI names (``prune-units``) to classes, for the pipeline parser
  (:mod:`oamipc.pipeline`).  The infrastructure never imports the pass library: passes register
  themselves when ``oamipc.passes`` is imported, which only the driver does.
* A transform that compares the network with what it was before the pipeline ran (layer
  reconstruction refits pruned layers to the dense network's outputs) says so with
  ``needs_original``; the pass manager then keeps a copy of the graph as it found it in
  :attr:`CompileContext.original` (unless the caller put one there), and every transform's outcome
  is recorded in :attr:`AnalysisManager.outcomes`, so a later pass can read what an earlier one did.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import fx

from oamipc.errors import OamipcError
from oamipc.plan import Planned

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class InputRange:
    """The range of the data, per input feature (shape ``(1, *sample_shape)``): the box on which the
    lossless removal proves units dead.  ``source`` says which data it spans, for the report."""

    lo: torch.Tensor
    hi: torch.Tensor
    samples: int
    source: str

    @classmethod
    def of(cls, x: torch.Tensor, source: str) -> InputRange:
        """The per-feature minimum and maximum over the samples ``x`` (shape ``(N, *sample_shape)``)."""
        return cls(x.amin(0, keepdim=True), x.amax(0, keepdim=True), int(x.shape[0]), source)


@dataclass
class CompileContext:
    """What analyses may need besides the graph: example inputs, data, seed, progress hooks.

    ``calib_x``/``calib_y`` are the calibration samples (importance on data, MIP).  ``input_range``
    is the range of all the data given (the train split), for the lossless removal's box; when it
    is None, that box is the calibration samples' range.  ``train_x`` is the whole split the
    calibration samples were drawn from, for passes that gain from more samples than the
    calibration set (reconstruction: forward passes are cheap); ``train_y`` its labels, when it has
    them (the MIP planner judges its moves on the part of the split its MILPs did not see).
    ``original`` is the network as it was before the pipeline ran (the dense reference); the
    driver sets it, or the pass manager copies the graph when a pass needs it.  Everything that
    changes an analysis's result and is not the graph or these inputs is an option of the
    analysis (a dataclass field), so the cache key covers it.  Analyses return data; they never
    write a report (the driver builds it from their results).
    """

    example_inputs: tuple[torch.Tensor, ...]
    calib_x: torch.Tensor | None = None
    calib_y: torch.Tensor | None = None
    seed: int = 0
    progress: Callable[[str, int, int], None] | None = None
    input_range: InputRange | None = None
    train_x: torch.Tensor | None = None
    train_y: torch.Tensor | None = None
    original: fx.GraphModule | None = None

    def tick(self, what: str, done: int, total: int) -> None:
        """Report progress of a long step (the CLI draws a bar; the library only calls back)."""
        if self.progress is not None:
            self.progress(what, done, total)


class Analysis(ABC, Generic[T]):
    """A cached computation over a GraphModule. Subclasses are frozen dataclasses."""

    name: ClassVar[str] = ""

    @abstractmethod
    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> T:
        """Compute the result; ask ``am`` for any analysis this one depends on."""


@dataclass
class PassResult:
    """What a transform returns: the (possibly new) GraphModule, whether it changed, and its
    outcome as data (``outcome``: e.g. the plan a prune pass applied), for the driver's report."""

    gm: fx.GraphModule
    modified: bool
    outcome: Any = None


class Pass(ABC):
    """A transform over a GraphModule. Subclasses are frozen dataclasses (fields = options)."""

    name: ClassVar[str] = ""
    preserves: ClassVar[tuple[type[Analysis[Any]], ...]] = ()
    #: The pass reads ``am.context.original`` (the graph before the pipeline ran).
    needs_original: ClassVar[bool] = False

    @abstractmethod
    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> PassResult:
        """Transform ``gm`` (in place or into a new module) and say whether it changed."""


class AnalysisManager:
    """Runs analyses on demand and caches their results until a transform invalidates them."""

    def __init__(self, context: CompileContext) -> None:
        self.context = context
        self._cache: dict[Analysis[Any], Any] = {}
        self.timings: dict[str, float] = {}
        # The result of the last planner that a pipeline listed (``plan-mip,prune-units``): a
        # prune pass without planning options of its own applies it.  Dropped with the cache.
        self.planned: Planned | None = None
        # (pass name, PassResult.outcome) of every transform run on this graph, in order: what a
        # later pass may need to know about earlier ones (the channels a prune pass kept).
        self.outcomes: list[tuple[str, Any]] = []

    def get(self, analysis: Analysis[T], gm: fx.GraphModule) -> T:
        """Return the result of ``analysis`` on ``gm``, computing it at most once per graph state."""
        if analysis in self._cache:
            return self._cache[analysis]
        start = time.perf_counter()
        result = analysis.run(gm, self)
        elapsed = time.perf_counter() - start
        key = analysis.name or type(analysis).__name__
        self.timings[key] = self.timings.get(key, 0.0) + elapsed
        log.debug("analysis %s took %.3f s", key, elapsed)
        self._cache[analysis] = result
        return result

    def cached(self, analysis: Analysis[T]) -> T | None:
        """The cached result of ``analysis``, or None when it has not run on this graph state."""
        return self._cache.get(analysis)

    def invalidate(self, preserved: Sequence[type[Analysis[Any]]] = ()) -> None:
        """Drop every cached result whose analysis class is not in ``preserved``."""
        keep = tuple(preserved)
        self._cache = {a: r for a, r in self._cache.items() if keep and isinstance(a, keep)}
        self.planned = None


_REGISTRY: dict[str, type[Pass] | type[Analysis[Any]]] = {}


def register(cls: type[Any]) -> type[Any]:
    """Class decorator: make a pass or analysis available to pipeline strings under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a non-empty class attribute `name` to be registered")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"two passes are registered as {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Pass] | type[Analysis[Any]]]:
    """The registered passes and analyses by CLI name (a copy)."""
    return dict(sorted(_REGISTRY.items()))


def options_of(cls: type[Any]) -> dict[str, dataclasses.Field[Any]]:
    """The options (dataclass fields) of a pass or analysis class, by field name."""
    if not dataclasses.is_dataclass(cls):
        return {}
    return {f.name: f for f in dataclasses.fields(cls)}


class PassManager:
    """Runs a sequence of passes/analyses over one GraphModule, sharing one AnalysisManager.

    Analyses listed in the pipeline are computed (and so land in the report); transforms modify
    the graph and invalidate what they do not preserve.
    """

    def __init__(self, steps: Sequence[Pass | Analysis[Any]], *, verify: bool = True) -> None:
        self.steps = list(steps)
        self.verify = verify
        self.outcomes: list[tuple[str, Any]] = []  # (pass name, PassResult.outcome) of every transform run

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> fx.GraphModule:
        done: list[str] = []
        if am.context.original is None and any(getattr(s, "needs_original", False) for s in self.steps):
            am.context.original = copy.deepcopy(gm)
        for step in self.steps:
            name = step.name or type(step).__name__
            try:
                if isinstance(step, Analysis):
                    result = am.get(step, gm)
                    if isinstance(result, Planned):
                        am.planned = result
                else:
                    start = time.perf_counter()
                    result = step.run(gm, am)
                    am.timings[name] = am.timings.get(name, 0.0) + time.perf_counter() - start
                    gm = result.gm
                    self.outcomes.append((name, result.outcome))
                    am.outcomes.append((name, result.outcome))
                    if result.modified:
                        am.invalidate(step.preserves)
                        if self.verify:
                            self._verify(gm, am)
            except OamipcError as exc:
                after = f" (after: {', '.join(done)})" if done else ""
                raise type(exc)(f"pass {name}{after}: {exc}") from exc
            done.append(name)
        return gm

    @staticmethod
    def _verify(gm: fx.GraphModule, am: AnalysisManager) -> None:
        """Lint, recompile and re-propagate shapes after a modification."""
        from oamipc.tracing import propagate_shapes

        gm.graph.lint()
        gm.recompile()
        propagate_shapes(gm, am.context.example_inputs, transformed=True)
