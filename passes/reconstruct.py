"""Layer reconstruction: refit the pruned network's layers to the dense network's layer outputs.

Removing units changes what every later layer sees.  This transform refits the weights (and
bias) of each Linear and Conv layer, one at a time in graph order, so that the layer's output on
sample inputs is as close as possible, in least squares, to the output of the same layer of the
original (dense) network on the same inputs.  The idea is ThiNet's (Luo et al., ICCV 2017) and
OSSCAR's (Meng et al., ICML 2024): a closed-form ridge regression per layer; the code is ours.

How, and why:

* **Pairs of layers.** Pruning keeps module names (the surgery swaps a module for a smaller one
  under the same qualified name), so the pruned layer ``fc1`` is compared with the dense layer
  ``fc1``.  The dense network is ``CompileContext.original`` (the graph before the pipeline
  ran).  Which output channels of the dense layer the pruned one kept is read from the prune
  passes' outcomes (``PruneOutcome.kept_outputs``, composed when several prune passes ran).
* **Order.** Layers are refit in graph (topological) order.  The input ``X`` of a layer comes
  from the pruned network whose earlier layers are already refit; the target ``Y`` is the dense
  network's output of that layer, its kept channels only, on the same samples.  So each fit also
  corrects the error that earlier layers left.
* **Pre-activation targets.** ``Y`` is the layer's own output (before BatchNorm, activation,
  pooling).  Folding a BatchNorm that follows would change nothing: it is an affine map per
  channel, every output channel is fit independently, and scaling a target channel scales its
  solution (only the regulariser's weight per channel would differ).
* **Which layers.** ``layers=all`` refits every Linear/Conv layer whose output on the samples
  differs from the dense one (relative error above ``1e-6``); a layer upstream of every removed
  unit reproduces the dense output already and is left as it is.  Where that is plain from the
  graph (the layer reads the network input through parameter-free nodes, the same ones as in the
  dense graph, and holds the dense layer's kept rows of weights and bias, bit for bit: the first
  layer of most networks) it is left without running the samples through it; this saved about
  0.3 s of LeNet-5's compile (conv1's 196,608 regression rows) and gives the same weights.
  ``layers=readers`` refits only
  the layers whose input width shrank (the direct readers of removed units).  A refit is kept only
  when it lowers the layer's error on the fitting samples (ridge can lose to the old weights).
* **Streaming.** Both networks run over the samples in batches, node by node
  (:class:`_Frontiers`): for layer ``L`` each batch's pruned pass is paused just before ``L``
  (its input) and its dense pass just after ``L`` (its target, read before any in-place
  activation overwrites it); the batch's normal equations are summed and the batch's rows
  dropped.  A paused pass holds only the values a later node still reads, and it is resumed for
  the next layer, so each network runs about once over the samples, not once per layer (that
  rerun of every prefix took 80% of the pass on MobileNetV2).  Paused passes are kept while they
  hold at most ``CACHE_BYTES`` together; a batch beyond that reruns from its input for the next
  layer (the same values, so the bound changes the time, never the fit).  A forward batch is
  ``batch_size`` samples, fewer when one sample's largest activation times the batch would pass
  ``FORWARD_ELEMENTS``, and a batch whose regression rows would hold more than ``ROW_ELEMENTS``
  values is summed in slices of samples.  So the pass's memory is bounded whatever the sample
  count and input size (about ``CACHE_BYTES`` plus one batch's forward pass and rows: MobileNetV2
  at 224x224 with 256 samples held 12 GiB before, benchmarks/RESULTS.md).  The three bounds are
  far above what the digits and Fashion-MNIST networks reach (LeNet-5 keeps its batches of 256,
  one slice of rows), so their fits are those of the unbounded computation, bit for bit.
* **The fit.** Ridge regression with an intercept, solved in float64 from accumulated
  ``X^T X`` and ``X^T Y`` (batches are streamed, never stacked):
  ``W = (X^T X + lambda D)^-1 X^T Y`` with ``lambda = ridge * mean(diag(X^T X))`` over the weight
  columns and ``D`` the identity on them (the intercept is not penalised).  Cholesky; a singular
  system (``ridge=0`` with dead inputs) falls back to the minimum-norm least-squares solution.
* **Bias.** The intercept goes into the layer's bias.  A layer without one (a conv before a
  BatchNorm) gets it folded into the running mean of the BatchNorm that alone reads it; a layer
  with neither is fit without intercept, so reconstruction adds no parameter.
* **Convolutions.** One row per output position: the input window under the kernel (an
  unfolded patch), gathered after explicit padding (any ``padding``, ``'same'``, and every
  ``padding_mode``), with the layer's stride and dilation; Conv1d as a Conv2d of height 1.
  Grouped convolutions are fit per group (the patch columns and output channels of one group
  form one regression), which makes a depthwise convolution one small fit per channel
  (``k*k + 1`` unknowns).  A conv layer has many rows per sample: at most
  ``max_rows`` rows enter a fit, the same number of positions from every sample, drawn without
  replacement from a generator seeded with the compile's seed (deterministic).  Only the windows
  of the drawn positions are gathered (``unfold`` would build every window first, most of them
  to be thrown away: it took most of the pass's time on a VGG-style net).
* **Samples.** ``samples`` inputs drawn (seeded) from the whole train split the calibration set
  came from (``CompileContext.train_x``), or the calibration samples when that is all there is;
  ``samples=0`` takes all of them.  The default (``None``) is 4096 (more helped little and cost
  in proportion, fewer lost up to 2.5 points: benchmarks/RESULTS.md), lowered for networks whose
  forward passes are expensive: to ``2**37 / (dense MACs per sample * layers)``, but never below
  512 (SmallVGG at 28x28: 2,317 samples; benchmarks/reconstruct_samples.py measures fewer and
  more).  The rule counts MACs, not seconds, so it gives the same samples on every machine.  It
  was made when the pass reran each network's prefix for every layer; streaming made the pass
  cheaper than the rule assumes, but the rule is kept as it was, so that no network's sample
  count (and fit) changed with streaming.
* **Not refit.** A module called more than once, or whose weight another module shares (pruning
  keeps their units, and one fit cannot serve two inputs); layers inside leaf modules (opaque to
  the graph); models with several inputs (the data holds one) are refused with an error.
  Only Linear and Conv layers are refit: with ``prune_embed`` (a transformer's residual stream
  narrowed), the layers whose outputs changed (those after the stream's first writer) are refit
  to the dense outputs of their kept channels, which absorbs part of what the narrower LayerNorm
  statistics changed; the LayerNorms, embeddings, class token and positional embedding keep their
  sliced values (``tests/test_prune_embed.py``).

The outcome (:class:`ReconstructOutcome`) lists every layer with its relative output error
before and after (on the fitting rows), the network output's relative error against the dense
one before and after, the samples and the seconds: the report's ``reconstruct`` section.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from oamipc import ir
from oamipc.errors import DataError, UsageError
from oamipc.passmanager import AnalysisManager, Pass, PassResult, register

from .costs import CostAnalysis, count_costs
from .prune_units import PruneOutcome
from .unit_groups import UnitGroupAnalysis

log = logging.getLogger(__name__)

#: A layer whose relative output error is at most this already reproduces the dense layer.
MATCH_TOL = 1e-6
#: ``samples=None``: this many samples, fewer when ``dense MACs * layers`` per sample is large:
AUTO_SAMPLES = 4096
#: at most this many MACs of forward passes (dense MACs per sample * layers * samples),
AUTO_WORK_MACS = 2**37
#: but never fewer samples than this.
AUTO_MIN_SAMPLES = 512
#: Elements of one chunk of gathered conv windows (bounds the memory of a conv's regression rows).
_CHUNK_ELEMENTS = 1 << 24
#: At most this many elements in one activation of a forward batch (fewer samples per pass on big inputs).
FORWARD_ELEMENTS = 1 << 25
#: At most this many values in the regression rows of one step of the normal equations' sums.
ROW_ELEMENTS = 1 << 25
#: Bytes of paused forward passes kept from one layer to the next (beyond them a batch reruns from its input).
CACHE_BYTES = 1 << 31
_LAYER_CHOICES = ("all", "readers")
#: The layers this pass refits.
Fittable = nn.Linear | nn.Conv1d | nn.Conv2d
_Conv = nn.Conv1d | nn.Conv2d
_Norm = nn.BatchNorm1d | nn.BatchNorm2d


@dataclass(frozen=True)
class LayerFit:
    """One layer's reconstruction: sizes, fitting rows, relative output error before and after."""

    name: str
    kind: str
    in_width: int
    out_width: int
    rows: int
    error_before: float
    error_after: float
    refit: bool
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "in": self.in_width, "out": self.out_width, "rows": self.rows,
                "error_before": self.error_before, "error_after": self.error_after, "refit": self.refit,
                "note": self.note}


@dataclass(frozen=True)
class ReconstructOutcome:
    """What the reconstruction did: per-layer fits, the network output's error, samples, time."""

    layers: list[LayerFit]
    samples: int
    source: str  # "train" (drawn from the train split) or "calibration"
    options: dict[str, Any]
    output_error_before: float
    output_error_after: float
    seconds: float
    batch: int = 0  # samples per forward pass
    forward_passes: int = 0  # forward passes started from the input, both networks, for the fits
    cpu_seconds: float = 0.0  # the process's CPU time (all threads) in the pass: wall time is the machine's load

    @property
    def refit(self) -> int:
        return sum(f.refit for f in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """The report's ``reconstruct`` section."""
        return {"layers_refit": self.refit, "samples": self.samples, "source": self.source, **self.options,
                "output_error_before": self.output_error_before, "output_error_after": self.output_error_after,
                "seconds": self.seconds, "forward_batch": self.batch, "forward_passes": self.forward_passes,
                "cpu_seconds": self.cpu_seconds,
                "layers": [f.to_dict() for f in self.layers]}


@dataclass
class _Stats:
    """Accumulated normal equations of one layer, per group: ``X^T X``, ``X^T Y``, ``sum Y^2``, rows."""

    xtx: torch.Tensor  # (groups, d, d) float64, last column the intercept when fitted
    xty: torch.Tensor  # (groups, d, o) float64
    yy: torch.Tensor  # (groups,) float64
    rows: int = 0


@dataclass
class _Layer:
    """A layer to refit: its module in both networks and where its input lives in the graph."""

    target: str
    module: Fittable
    dense: Fittable
    kept_out: np.ndarray
    bias_sink: _Norm | None = field(default=None)  # the BatchNorm taking the intercept, for a bias-less layer


@register
@dataclass(frozen=True)
class ReconstructPass(Pass):
    """Refit every pruned Linear/Conv layer to the dense layer's output; see the module docstring.

    Options: ``ridge`` (relative regulariser, times the mean diagonal of ``X^T X``), ``samples``
    (inputs to fit on; 0: all available; None: 4096, fewer for big networks, see
    :func:`auto_samples`), ``layers`` (``all`` | ``readers``), ``max_rows`` (rows per conv fit),
    ``batch_size`` (samples per forward pass).
    """

    name: ClassVar[str] = "reconstruct"
    preserves: ClassVar[tuple[type[Any], ...]] = (UnitGroupAnalysis, CostAnalysis)
    needs_original: ClassVar[bool] = True
    ridge: float = 1e-3
    samples: int | None = None
    layers: str = "all"
    max_rows: int = 200_000
    batch_size: int = 256
    #: Measure the network output's error before and after (the report's row); off for refits whose
    #: network is only judged (the refit selection's candidates): two passes of both networks fewer.
    measure: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.ridge, (int, float)) and math.isfinite(self.ridge) and self.ridge >= 0):
            raise UsageError(f"reconstruct ridge must be a finite number >= 0, got {self.ridge!r}")
        if self.samples is not None and (not isinstance(self.samples, int) or self.samples < 0):
            raise UsageError(f"reconstruct samples must be an integer >= 0 (0: all available), got {self.samples!r}")
        if self.layers not in _LAYER_CHOICES:
            raise UsageError(f"reconstruct layers must be one of {', '.join(_LAYER_CHOICES)}, got {self.layers!r}")
        for key in ("max_rows", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"reconstruct {key.replace('_', '-')} must be a positive integer, got {value!r}")

    def options(self) -> dict[str, Any]:
        return {"ridge": self.ridge, "layers": self.layers, "max_rows": self.max_rows,
                "samples_option": "auto" if self.samples is None else self.samples}

    def run(self, gm: fx.GraphModule, am: AnalysisManager) -> PassResult:
        start, start_cpu = time.perf_counter(), time.process_time()
        ctx = am.context
        dense = ctx.original
        if dense is None:
            raise UsageError("reconstruct needs the network before pruning; run it through a PassManager")
        if len(ctx.example_inputs) != 1:
            raise UsageError(f"reconstruct needs a model with one input (the data holds one), this one takes "
                             f"{len(ctx.example_inputs)}; leave reconstruction off")
        gm.eval()
        dense.eval()
        layers, skipped = _layers(gm, dense, _kept_outputs(am.outcomes))
        wanted = self.samples if self.samples is not None else auto_samples(count_costs(dense).macs, len(layers))
        x, source = _inputs(wanted, ctx.train_x, ctx.calib_x, ctx.seed)
        fits: list[LayerFit] = list(skipped)
        batch = forward_batch(dense, self.batch_size, int(ctx.example_inputs[0].shape[0]))
        with torch.no_grad():
            reference: list[list[torch.Tensor]] = []  # the dense outputs, kept for the second measurement
            out_before = _output_error(gm, dense, x, batch, reference) if self.measure else math.nan
            streams = _Frontiers(gm, dense, x, batch, CACHE_BYTES)
            for i, layer in enumerate(layers):
                if ctx.progress is not None:
                    ctx.tick("reconstruct", i, len(layers))
                if self.layers == "readers" and _in_width(layer.module) == _in_width(layer.dense):
                    continue
                if _same_as_dense(gm, dense, layer):
                    fits.append(LayerFit(layer.target, type(layer.module).__name__, _in_width(layer.module),
                                         _out_width(layer.module), 0, 0.0, 0.0, False, SAME_NOTE))
                    continue
                fits.append(self._refit(streams, layer, len(x), ctx.seed + i))
            streams.close()
            if ctx.progress is not None:
                ctx.tick("reconstruct", len(layers), len(layers))
            refit = any(f.refit for f in fits)
            out_after = _output_error(gm, dense, x, batch, reference) if refit and self.measure else out_before
        outcome = ReconstructOutcome(fits, len(x), source, self.options(), out_before, out_after,
                                     time.perf_counter() - start, batch, streams.started,
                                     time.process_time() - start_cpu)
        log.info("reconstruct: refit %d layers on %d samples; network output error %.4g -> %.4g in %.2f s",
                 outcome.refit, len(x), out_before, out_after, outcome.seconds)
        return PassResult(gm, modified=outcome.refit > 0, outcome=outcome)

    def _refit(self, streams: _Frontiers, layer: _Layer, samples: int, seed: int) -> LayerFit:
        mod = layer.module
        kind = type(mod).__name__
        intercept = getattr(mod, "bias", None) is not None or layer.bias_sink is not None
        stats = _accumulate(streams.pairs(layer.target), layer, samples, self.max_rows, intercept, seed)
        w_old = _weights(mod, intercept)
        err_before = _rel_error(stats, w_old)
        def fit(after: float, refit: bool, note: str = "") -> LayerFit:
            return LayerFit(layer.target, kind, _in_width(mod), _out_width(mod), stats.rows, err_before, after, refit,
                            note)

        if err_before <= MATCH_TOL:
            return fit(err_before, False, "reproduces the dense layer already")
        w_new = solve_ridge(stats.xtx, stats.xty, self.ridge, intercept)
        err_after = _rel_error(stats, w_new)
        if not err_after < err_before:
            return fit(err_before, False, f"the refit did not lower the error ({err_after:.4g})")
        _write(mod, w_new, intercept, layer.bias_sink)
        return fit(err_after, True)


def layer_statistics(gm: fx.GraphModule, targets: list[str], x: torch.Tensor, max_rows: int, seed: int,
                     example_batch: int, batch_size: int = 256
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """The normal equations of each layer in ``targets`` on the network's own inputs and outputs.

    Per layer ``(X^T X, X^T Y, sum Y^2, rows)`` in float64, the rows laid out as the refit lays
    them out (a Linear's input features; a convolution's unfolded windows, channel then kernel row
    then column, at most ``max_rows`` rows over the samples), with the intercept's column of ones
    last; a grouped convolution keeps its first axis (groups).  What a layer's refit could
    reproduce from any subset of its input columns follows from these alone, which is what the
    refit-aware ranking (:mod:`.refit_orders`) reads.  Only Linear/Conv layers called once.
    ``example_batch`` is the batch of the traced graph's shape metadata (the forward batch's bound).
    """
    out: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = {}
    gm.eval()
    batch = forward_batch(gm, batch_size, example_batch)
    calls = _calls(gm)
    with torch.no_grad():
        streams = _Frontiers(gm, gm, x, batch, CACHE_BYTES)
        for i, target in enumerate(targets):
            mod = ir.get_module(gm, target)
            if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)) or len(calls.get(target, ())) != 1:
                continue
            layer = _Layer(target, mod, mod, np.arange(_out_width(mod), dtype=np.int64))
            stats = _accumulate(streams.pairs(target), layer, len(x), max_rows, True, seed + i)
            out[target] = (stats.xtx, stats.xty, stats.yy, stats.rows)
        streams.close()
    return out


# ----------------------------------------------------------------------------------------------
# which samples, which layers, and which of their outputs


def auto_samples(macs_per_sample: float, layers: int) -> int:
    """The default sample count: ``AUTO_SAMPLES``, lowered so that ``macs * layers * samples`` stays
    within ``AUTO_WORK_MACS``, never below ``AUTO_MIN_SAMPLES``."""
    cap = AUTO_WORK_MACS // max(1, math.ceil(macs_per_sample) * max(1, layers))
    return max(AUTO_MIN_SAMPLES, min(AUTO_SAMPLES, cap))


def _inputs(samples: int, train_x: torch.Tensor | None, calib_x: torch.Tensor | None,
            seed: int) -> tuple[torch.Tensor, str]:
    """The fitting inputs: ``samples`` (0: all) drawn (seeded) from the train split, else the calibration set."""
    pool, source = (train_x, "train") if train_x is not None else (calib_x, "calibration")
    if pool is None or len(pool) == 0:
        raise DataError("reconstruct needs sample inputs: give data (--data) or leave reconstruction off")
    if samples == 0 or samples >= len(pool):
        return pool.float(), source
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(pool), generator=gen)[:samples].sort().values
    return pool[idx].float(), source


def _kept_outputs(outcomes: list[tuple[str, Any]]) -> dict[str, np.ndarray]:
    """Output channels of the original each layer kept, composed over every prune pass that ran."""
    composed: dict[str, np.ndarray] = {}
    for _, outcome in outcomes:
        if not isinstance(outcome, PruneOutcome):
            continue
        for target, idx in outcome.kept_outputs.items():
            composed[target] = composed[target][idx] if target in composed else np.asarray(idx)
    return composed


def _in_width(mod: Fittable) -> int:
    return int(mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels)


def _out_width(mod: Fittable) -> int:
    return int(mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels)


def _calls(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
    return calls


def _layers(gm: fx.GraphModule, dense: fx.GraphModule,
            kept_out: dict[str, np.ndarray]) -> tuple[list[_Layer], list[LayerFit]]:
    """The Linear/Conv layers to refit, in graph order, and the ones left out (with why)."""
    calls, dense_calls = _calls(gm), _calls(dense)
    shared: dict[int, int] = {}
    for _, p in gm.named_parameters(remove_duplicate=False):
        shared[id(p)] = shared.get(id(p), 0) + 1
    out: list[_Layer] = []
    skipped: list[LayerFit] = []
    for target, nodes in calls.items():
        mod = ir.get_module(gm, target)
        if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            continue
        kind = type(mod).__name__

        def skip(why: str, mod: Fittable = mod, target: str = target, kind: str = kind) -> None:
            skipped.append(LayerFit(target, kind, _in_width(mod), _out_width(mod), 0, math.nan, math.nan, False, why))

        dense_mod = _submodule(dense, target)
        if len(nodes) > 1 or len(dense_calls.get(target, ())) != 1:
            skip("called more than once")
            continue
        if shared.get(id(mod.weight), 0) > 1:
            skip("shares its weight with another module")
            continue
        if not isinstance(dense_mod, (nn.Linear, nn.Conv1d, nn.Conv2d)) or type(dense_mod) is not type(mod):
            skip("no layer of this name and type in the original network")
            continue
        width, dense_width = _out_width(mod), _out_width(dense_mod)
        idx = kept_out.get(target, np.arange(dense_width)) if width != dense_width else np.arange(width)
        if len(idx) != width or (len(idx) and int(np.max(idx)) >= dense_width):
            skip("cannot tell which original outputs it kept")
            continue
        out.append(_Layer(target, mod, dense_mod, np.asarray(idx, dtype=np.int64), _bias_sink(gm, nodes[0], mod)))
    return out, skipped


#: The note of a layer left as it is because it computes the dense layer's kept outputs (:func:`_same_as_dense`).
SAME_NOTE = "reproduces the dense layer already (the dense input and weights)"


def _same_as_dense(gm: fx.GraphModule, dense: fx.GraphModule, layer: _Layer) -> bool:
    """Whether ``layer`` provably computes the dense layer's kept outputs: its input comes from the
    graph inputs through parameter-free nodes only, the same nodes (op, target, arguments) as in the
    dense graph, and it holds the dense layer's kept rows of weights and bias unchanged."""
    mod, ref = layer.module, layer.dense
    if isinstance(mod, nn.Conv1d | nn.Conv2d):
        assert isinstance(ref, nn.Conv1d | nn.Conv2d)
        if (mod.stride, mod.padding, mod.dilation, mod.groups, mod.padding_mode) != (
                ref.stride, ref.padding, ref.dilation, ref.groups, ref.padding_mode):
            return False
    idx = torch.as_tensor(layer.kept_out, dtype=torch.long)
    if mod.weight.shape[1:] != ref.weight.shape[1:] or not torch.equal(mod.weight, ref.weight[idx]):
        return False
    if (mod.bias is None) != (ref.bias is None) or (mod.bias is not None and not torch.equal(mod.bias, ref.bias[idx])):
        return False
    chains = []
    for net in (gm, dense):
        node = _calls(net)[layer.target][0]
        seen: list[fx.Node] = []
        todo = list(node.all_input_nodes)
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            if n.op == "get_attr" or n.op == "call_module" and _has_state(ir.get_module(net, str(n.target))):
                return False
            seen.append(n)
            todo += n.all_input_nodes
        chains.append(sorted((n.name, n.op, str(n.target), str(n.args), str(n.kwargs)) for n in seen))
    return chains[0] == chains[1]


def _has_state(mod: nn.Module) -> bool:
    """Whether a module holds parameters or buffers (a node that may differ between the networks)."""
    return next(iter(mod.parameters()), None) is not None or next(iter(mod.buffers()), None) is not None


def _submodule(gm: nn.Module, target: str) -> nn.Module | None:
    try:
        return gm.get_submodule(target)
    except AttributeError:
        return None


def _bias_sink(gm: fx.GraphModule, node: fx.Node, mod: Fittable) -> _Norm | None:
    """For a layer without bias: the BatchNorm (running statistics, eval) that is its only reader."""
    if getattr(mod, "bias", None) is not None or len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op != "call_module":
        return None
    bn = ir.get_module(gm, str(user.target))
    if (isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) and bn.running_mean is not None and not bn.training
            and user.args and user.args[0] is node and len(_calls(gm).get(str(user.target), ())) == 1):
        return bn
    return None


# ----------------------------------------------------------------------------------------------
# streaming the two networks batch by batch, layer by layer


def forward_batch(dense: fx.GraphModule, batch_size: int, example_batch: int) -> int:
    """Samples per forward pass: ``batch_size``, fewer when one sample's largest activation times
    the batch would exceed ``FORWARD_ELEMENTS`` (read from the dense graph's shape metadata)."""
    per_sample = max(ir.activation_sizes(dense, example_batch), default=0)
    return max(1, min(batch_size, FORWARD_ELEMENTS // per_sample)) if per_sample else batch_size


class _Stepper:
    """One batch's forward pass through a graph, run node by node and paused at a layer.

    It keeps only the values that a node not yet run still reads (the frontier), so resuming it
    for the next layer costs the nodes in between, not the whole prefix again.  A pass resumed
    after a layer was refit runs that layer with its new weights: the values are those of a
    whole forward pass of the network as it is now (the same operations on the same batch).
    """

    def __init__(self, gm: fx.GraphModule, x: torch.Tensor, index: dict[fx.Node, int], dies: dict[int, list[fx.Node]]
                 ) -> None:
        self.interp = fx.Interpreter(gm, garbage_collect_values=False)
        self.interp.env = {}
        self.interp.args_iter = iter(gm.graph.process_inputs(x))
        self.nodes = list(gm.graph.nodes)
        self.index, self.dies = index, dies
        self.next = 0

    def _run_to(self, stop: int) -> None:
        env = self.interp.env
        while self.next < stop:
            for dead in self.dies.get(self.next - 1, ()):
                env.pop(dead, None)
            node = self.nodes[self.next]
            env[node] = self.interp.run_node(node)
            self.next += 1

    def input_of(self, node: fx.Node) -> torch.Tensor:
        """The first input of ``node`` (a module call), running the graph up to it (not through it)."""
        self._run_to(self.index[node])
        args, kwargs = self.interp.fetch_args_kwargs_from_env(node)
        return args[0] if args else next(iter(kwargs.values()))

    def output_of(self, node: fx.Node) -> torch.Tensor:
        """The output of ``node``, running the graph up to and through it."""
        self._run_to(self.index[node] + 1)
        return self.interp.env[node]

    def nbytes(self) -> int:
        """Bytes of the activations it holds (each storage once; parameters not counted)."""
        seen: dict[int, int] = {}
        for node, value in self.interp.env.items():
            if node.op == "get_attr":
                continue
            for t in _leaves(value):
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())


def _schedule(gm: fx.GraphModule) -> tuple[dict[fx.Node, int], dict[int, list[fx.Node]]]:
    """Each node's position, and which values die after which position (their last reader's; a
    value nobody reads dies right after it is made)."""
    index = {node: i for i, node in enumerate(gm.graph.nodes)}
    dies: dict[int, list[fx.Node]] = {}
    for node, i in index.items():
        last = max((index[u] for u in node.users), default=i)
        dies.setdefault(last, []).append(node)
    return index, dies


class _Frontiers:
    """Both networks' forward passes over the fitting samples, batch by batch, paused at a layer.

    For layer ``L`` every batch yields the pruned network's input of ``L`` (its earlier layers
    already refit) and the dense network's output of ``L``.  A batch's paused passes are kept
    for the next layer while all kept passes hold at most ``budget`` bytes; a batch whose passes
    were not kept is run again from the input.  Either way the values are the same, so the budget
    decides the time, never the fit; the memory is the budget plus one batch's forward pass,
    whatever the number of samples.
    """

    def __init__(self, gm: fx.GraphModule, dense: fx.GraphModule, x: torch.Tensor, batch: int, budget: int) -> None:
        self.nets = (gm, dense)
        self.schedules = (_schedule(gm), _schedule(dense))
        self.calls = (_calls(gm), _calls(dense))
        self.x, self.batch, self.budget = x, batch, budget
        self.kept: dict[tuple[int, int], tuple[_Stepper, int]] = {}  # (net, batch) -> (paused pass, its bytes)
        self.held = 0
        self.started = 0

    def _stepper(self, net: int, i: int, sl: slice, node: fx.Node) -> _Stepper:
        old = self.kept.pop((net, i), None)
        if old is not None:
            self.held -= old[1]
            if old[0].next <= old[0].index[node]:  # not past the node yet (graph order is layer order)
                return old[0]
        self.started += 1
        return _Stepper(self.nets[net], self.x[sl], *self.schedules[net])

    def _keep(self, net: int, i: int, stepper: _Stepper) -> None:
        size = stepper.nbytes()
        if self.held + size <= self.budget:
            self.kept[(net, i)] = (stepper, size)
            self.held += size

    def pairs(self, target: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per batch: (pruned input of ``target``, dense output of ``target``).  When both networks
        are one (:func:`layer_statistics`), one pass per batch gives both."""
        node, dense_node = self.calls[0][target][0], self.calls[1][target][0]
        for i, sl in enumerate(_batches(len(self.x), self.batch)):
            pruned = self._stepper(0, i, sl, node)
            if self.nets[0] is self.nets[1]:
                xin = pruned.input_of(node)
                yield xin, pruned.output_of(node)
                self._keep(0, i, pruned)
                continue
            dense = self._stepper(1, i, sl, dense_node)
            yield pruned.input_of(node), dense.output_of(dense_node)
            self._keep(0, i, pruned)
            self._keep(1, i, dense)

    def close(self) -> None:
        self.kept.clear()
        self.held = 0


def _batches(n: int, size: int) -> Iterator[slice]:
    for lo in range(0, n, size):
        yield slice(lo, min(n, lo + size))


def _leaves(value: Any) -> list[torch.Tensor]:
    """The tensors in a model output (a tensor, or tuples/lists/dicts of them)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _leaves(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _leaves(v)]
    return []


def _output_error(gm: nn.Module, dense: nn.Module, x: torch.Tensor, batch: int,
                  reference: list[list[torch.Tensor]]) -> float:
    """Relative Frobenius error of the pruned network's outputs against the dense network's.

    ``reference`` caches the dense outputs per batch: filled on the first call (when they are
    small: logits, not images), read on the next.
    """
    num = den = 0.0
    cached, keep = bool(reference), False
    for i, sl in enumerate(_batches(len(x), batch)):
        want = reference[i] if cached else _leaves(dense(x[sl]))
        if not cached:
            if i == 0:  # keep them when all of them hold at most _CHUNK_ELEMENTS values
                keep = sum(t.numel() for t in want) // (sl.stop - sl.start) * len(x) <= _CHUNK_ELEMENTS
            if keep:
                reference.append(want)
        for a, b in zip(_leaves(gm(x[sl])), want):
            if a.shape != b.shape:
                continue
            num += float((a.double() - b.double()).pow(2).sum())
            den += float(b.double().pow(2).sum())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


# ----------------------------------------------------------------------------------------------
# rows of the regression


def _conv_geometry(mod: _Conv) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], list[int], str]:
    """Kernel, stride, dilation (as 2-D), the explicit F.pad amounts and mode of a Conv1d/Conv2d."""
    two = isinstance(mod, nn.Conv2d)
    k = tuple(int(v) for v in mod.kernel_size)
    s = tuple(int(v) for v in mod.stride)
    d = tuple(int(v) for v in mod.dilation)
    padding = mod.padding
    pairs: list[tuple[int, int]] = []
    for i in range(len(k)):
        if padding == "valid":
            pairs.append((0, 0))
        elif padding == "same":
            total = d[i] * (k[i] - 1)
            pairs.append((total // 2, total - total // 2))
        else:
            p = int(padding[i])
            pairs.append((p, p))
    pads = [v for pair in reversed(pairs) for v in pair]  # F.pad: last dimension first
    mode = {"zeros": "constant"}.get(mod.padding_mode, mod.padding_mode)
    if not two:
        k, s, d = (1, *k), (1, *s), (1, *d)
    return k, s, d, pads, mode  # type: ignore[return-value]


def _rows(mod: Fittable, xin: torch.Tensor, y: torch.Tensor, per_sample: int,
          gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Regression rows of one batch: inputs ``(R, groups, d)`` and targets ``(R, groups, o)``.

    At most ``per_sample`` rows (output positions) per sample, drawn without replacement.
    """
    if isinstance(mod, nn.Linear):
        b = xin.shape[0]
        xs = xin.reshape(b, -1, xin.shape[-1])
        ys = y.reshape(b, -1, y.shape[-1])
        xs, ys = _pick(xs, ys, per_sample, gen)
        return xs.reshape(-1, 1, xs.shape[-1]), ys.reshape(-1, 1, ys.shape[-1])
    k, s, d, pads, mode = _conv_geometry(mod)
    groups = int(mod.groups)
    if xin.dim() == 3:
        xin, y = xin.unsqueeze(2), y.unsqueeze(2)
    if any(pads):
        xin = F.pad(xin, pads, mode=mode)
    b, c, height, width = xin.shape
    o, h_out, w_out = y.shape[1:]
    if ((height - d[0] * (k[0] - 1) - 1) // s[0] + 1, (width - d[1] * (k[1] - 1) - 1) // s[1] + 1) != (h_out, w_out):
        raise UsageError(f"reconstruct: the windows of {type(mod).__name__} do not match its output size "
                         f"{h_out}x{w_out}")
    positions = h_out * w_out
    per = min(positions, per_sample)
    if per < positions:  # ``per`` positions of each sample, without replacement
        pos = torch.rand(b, positions, generator=gen).argsort(dim=1)[:, :per]
    else:
        pos = torch.arange(positions).expand(b, positions)
    x_hwc = xin.permute(0, 2, 3, 1)  # a window's values become one gather of (kh, kw, c) blocks
    rows = (pos // w_out)[..., None] * s[0] + torch.arange(k[0]) * d[0]  # (b, per, kh)
    cols = (pos % w_out)[..., None] * s[1] + torch.arange(k[1]) * d[1]  # (b, per, kw)
    width_d = c // groups * k[0] * k[1]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, per * c * k[0] * k[1]))
    xs_all = []
    for sl in _batches(b, chunk):
        n = torch.arange(sl.start, sl.stop)[:, None, None, None]
        patches = x_hwc[n, rows[sl, :, :, None], cols[sl, :, None, :]]  # (B, per, kh, kw, c)
        # Column order of the weight's flattening: channel (within its group), then kernel row, column.
        xs_all.append(patches.permute(0, 1, 4, 2, 3).reshape(-1, groups, width_d))
    ys = y.reshape(b, o, positions).gather(2, pos[:, None, :].expand(b, o, per))  # (b, o, per)
    xs = xs_all[0] if len(xs_all) == 1 else torch.cat(xs_all)
    return xs, ys.permute(0, 2, 1).reshape(-1, groups, o // groups)


def _pick(xs: torch.Tensor, ys: torch.Tensor, per: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``per`` of the positions (dim 1) of every sample, drawn without replacement (all if fewer)."""
    n = xs.shape[1]
    if per >= n:
        return xs, ys
    idx = torch.rand(xs.shape[0], n, generator=gen).argsort(dim=1)[:, :per]
    return (xs.gather(1, idx.unsqueeze(-1).expand(-1, -1, xs.shape[-1])),
            ys.gather(1, idx.unsqueeze(-1).expand(-1, -1, ys.shape[-1])))


def _accumulate(pairs: Iterator[tuple[torch.Tensor, torch.Tensor]], layer: _Layer, samples: int, max_rows: int,
                intercept: bool, seed: int) -> _Stats:
    """Sum the layer's normal equations over the batches of (pruned input, dense output) ``pairs``.

    A batch whose rows would hold more than ``ROW_ELEMENTS`` values is taken in slices of
    samples (the positions are drawn in the same order, so only the sums' grouping changes).
    """
    gen = torch.Generator().manual_seed(seed)
    per_sample = max(1, max_rows // max(1, samples))
    kept = torch.as_tensor(layer.kept_out, dtype=torch.long)
    linear = isinstance(layer.module, nn.Linear)
    stats: _Stats | None = None
    for xin, y_all in pairs:
        y = y_all.index_select(-1 if linear else 1, kept)
        b = xin.shape[0]
        step = max(1, ROW_ELEMENTS // max(1, _row_values(layer.module, xin, per_sample) // max(1, b)))
        for sl in _batches(b, step) if step < b else (slice(0, b),):
            rows, targets = _rows(layer.module, xin[sl], y[sl], per_sample, gen)
            xs = torch.empty(*rows.shape[:2], rows.shape[2] + intercept, dtype=torch.float64)
            xs[:, :, :rows.shape[2]] = rows  # float64, with the intercept's column of ones
            if intercept:
                xs[:, :, -1] = 1.0
            ys = targets.double()
            del rows, targets
            xg, yg = xs.transpose(0, 1), ys.transpose(0, 1)  # (groups, R, .)
            xtx, xty, yy = xg.transpose(1, 2) @ xg, xg.transpose(1, 2) @ yg, yg.pow(2).sum(dim=(1, 2))
            if stats is None:
                stats = _Stats(xtx, xty, yy, xs.shape[0])
            else:
                stats.xtx += xtx
                stats.xty += xty
                stats.yy += yy
                stats.rows += xs.shape[0]
            del xs, ys, xg, yg
    assert stats is not None
    return stats


def _row_values(mod: Fittable, xin: torch.Tensor, per_sample: int) -> int:
    """How many values the regression rows of the batch ``xin`` hold (inputs; an upper bound)."""
    if isinstance(mod, nn.Linear):
        positions = xin.numel() // max(1, xin.shape[0] * xin.shape[-1])
        return xin.shape[0] * min(per_sample, positions) * (xin.shape[-1] + 1)
    k = math.prod(int(v) for v in mod.kernel_size)
    return xin.shape[0] * per_sample * (int(mod.in_channels) * k + int(mod.groups))


# ----------------------------------------------------------------------------------------------
# the fit


def solve_ridge(xtx: torch.Tensor, xty: torch.Tensor, ridge: float, intercept: bool) -> torch.Tensor:
    """Per group ``g``: ``argmin_W |X W - Y|^2 + lambda_g |W_w|^2`` from ``X^T X`` and ``X^T Y``.

    Shapes ``(groups, d, d)`` and ``(groups, d, o)``.  ``lambda_g = ridge * mean(diag(X^T X))``
    over the weight columns; the last column is the unpenalised intercept when ``intercept``.
    Cholesky in float64; a singular system falls back to the minimum-norm least-squares solution.
    """
    d = xtx.shape[-1]
    n_w = d - 1 if intercept else d
    diag = torch.zeros(d, dtype=xtx.dtype)
    diag[:n_w] = 1.0
    scale = xtx.diagonal(dim1=1, dim2=2)[:, :n_w].mean(dim=1) if n_w else torch.zeros(xtx.shape[0], dtype=xtx.dtype)
    lam = ridge * scale  # (groups,)
    a = xtx + lam[:, None, None] * torch.diag(diag)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info.max()) == 0:
        return torch.cholesky_solve(xty, chol)
    return torch.linalg.lstsq(a, xty, driver="gelsd").solution


def _rel_error(stats: _Stats, w: torch.Tensor) -> float:
    """``|X W - Y| / |Y|`` over all groups, from the normal equations."""
    sq = (w.transpose(1, 2) @ stats.xtx @ w).diagonal(dim1=1, dim2=2).sum() - 2 * (w * stats.xty).sum() + stats.yy.sum()
    den = float(stats.yy.sum())
    return math.sqrt(max(float(sq), 0.0) / den) if den > 0 else math.sqrt(max(float(sq), 0.0))


def _weights(mod: Fittable, intercept: bool) -> torch.Tensor:
    """The layer's weights (and bias, or zero intercept) as ``(groups, d, o)`` float64, as the rows are laid out."""
    w = mod.weight.detach().double()
    if isinstance(mod, nn.Linear):
        groups, o = 1, w.shape[0]
    else:
        groups, o = int(mod.groups), w.shape[0]
    per = w.reshape(groups, o // groups, -1).transpose(1, 2)  # (groups, d_w, o_g)
    if intercept:
        bias = getattr(mod, "bias", None)
        b = bias.detach().double() if bias is not None else torch.zeros(o, dtype=torch.float64)
        per = torch.cat([per, b.reshape(groups, 1, o // groups)], dim=1)
    return per


def _write(mod: Fittable, w: torch.Tensor, intercept: bool, sink: _Norm | None) -> None:
    """Store the solution ``(groups, d, o)`` in the module (and the intercept where it goes)."""
    weight = mod.weight
    body = w[:, :-1, :] if intercept else w
    new = body.transpose(1, 2).reshape(weight.shape)
    with torch.no_grad():
        weight.copy_(new.to(weight.dtype))
        if intercept:
            b = w[:, -1, :].reshape(-1)
            bias = getattr(mod, "bias", None)
            if bias is not None:
                bias.copy_(b.to(bias.dtype))
            elif sink is not None and sink.running_mean is not None:
                # BN(y + b) = BN'(y) with the running mean lowered by b.
                sink.running_mean.sub_(b.to(sink.running_mean.dtype))
