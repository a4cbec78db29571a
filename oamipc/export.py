"""ONNX export of a (pruned) torch module, and the oracle check that the file computes the same.

Export writes exactly one self-contained ``.onnx`` file: the exporter runs in a scratch
directory, the result is checked (no side ``.data`` file, a symbolic batch dimension), and only
then copied to the destination with :func:`oamipc.atomic.atomic_output`, so a failed or
interrupted export never leaves a file behind.

Naming contract of every exported file (the benchmark and the verification rely on it):

- inputs ``input``, ``input_1``, ``input_2``, ... in the order of ``forward``'s arguments;
- outputs ``output``, ``output_1``, ... in the order the module returns them (nested tuples,
  lists and dict values are flattened depth first);
- with ``dynamic_batch`` (the default), dim 0 of every input and output is the symbol ``batch``.

Two exporters are offered: ``torchscript`` (the legacy tracer: ~0.2 s for a small net) and
``dynamo`` (``torch.export`` based: ~4 s, the one PyTorch develops further).  The default,
``auto``, runs ``torchscript`` and, when it fails (an op it cannot export, such as
``adaptive_avg_pool2d`` to a size that does not divide its input), ``dynamo``;
:func:`export` says which one wrote the file and why the first one did not.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import math
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oamipc.atomic import atomic_output, check_writable
from oamipc.errors import ExportError, LoadError, UsageError, first_line
from oamipc.runtime import make_session

__all__ = ["EXPORTERS", "Exported", "VerifyResult", "eval_mode", "export", "export_onnx", "input_names",
           "onnx_size_bytes", "output_names", "verify_onnx"]

log = logging.getLogger(__name__)

EXPORTERS: tuple[str, ...] = ("auto", "torchscript", "dynamo")
#: What ``auto`` tries, in order.
AUTO_ORDER: tuple[str, ...] = ("torchscript", "dynamo")
BATCH = "batch"

#: Batch sizes tried, in order, for the random inputs of :func:`verify_onnx`.  3 comes first: a
#: size that no example uses and that is not 1, so a hard-coded batch size cannot slip through.
_RANDOM_BATCH_SIZES = (3, 1, 5, 2, 7, 4, 6, 9, 11, 13)
_FIXED_BATCH_HINT = ("the module seems to hard-code its batch size: fix it (x.size(0), flatten) or export with "
                     "dynamic_batch=False")

#: Loggers that chatter during a dynamo export (registration of missing torchvision ops, symbolic
#: shape guards, ...); silenced to errors for the duration of the export.
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes",
                  "torch._dynamo", "onnxscript", "onnx_ir")


def input_names(n: int) -> list[str]:
    """ONNX input names for ``n`` inputs: ``input``, ``input_1``, ..."""
    return ["input" if i == 0 else f"input_{i}" for i in range(n)]


def output_names(n: int) -> list[str]:
    """ONNX output names for ``n`` outputs: ``output``, ``output_1``, ..."""
    return ["output" if i == 0 else f"output_{i}" for i in range(n)]


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put ``module`` in eval mode for the block, then restore every submodule's own mode.

    Restoring per submodule (not just ``module.train(was_training)``) keeps a deliberately mixed
    state, e.g. a frozen BatchNorm inside a model that is otherwise training.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exported:
    """An exported file: its path, the exporter that wrote it, and why the exporters tried before
    it failed (``(exporter, first line of its error)`` pairs, empty when the first one worked)."""

    path: Path
    exporter: str
    failed: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the report."""
        failed = [{"exporter": e, "error": why} for e, why in self.failed]
        return {"exporter": self.exporter, "exporters_failed": failed}


def export_onnx(module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...] | torch.Tensor,
                path: str | Path, *, opset: int | None = None, dynamic_batch: bool = True,
                exporter: str = "auto") -> Path:
    """Export ``module`` (in eval mode) to one self-contained ONNX file at ``path``; return the path.

    The same as :func:`export`, less the record of which exporter wrote the file.
    """
    return export(module, example_inputs, path, opset=opset, dynamic_batch=dynamic_batch, exporter=exporter).path


def export(module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...] | torch.Tensor,
           path: str | Path, *, opset: int | None = None, dynamic_batch: bool = True,
           exporter: str = "auto") -> Exported:
    """Export ``module`` (in eval mode) to one self-contained ONNX file at ``path``.

    ``example_inputs`` are the positional arguments of ``forward`` (a lone tensor is accepted).
    ``opset`` ``None`` takes the exporter's default.  ``exporter`` ``auto`` tries ``torchscript``
    and then ``dynamo`` (see the module docstring).  The destination is checked for writability
    before the (possibly slow) export starts.  Raises :class:`ExportError` naming the path and the
    first line of every exporter's complaint, :class:`OutputError` for a bad path.
    """
    if exporter not in EXPORTERS:
        raise UsageError(f"unknown exporter {exporter!r}: use one of {', '.join(EXPORTERS)}")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise UsageError(f"cannot export to {path}: example_inputs must be a non-empty tuple of tensors")
    dest = check_writable(path)
    order = AUTO_ORDER if exporter == "auto" else (exporter,)
    failed: list[tuple[str, str]] = []
    used = order[0]
    with eval_mode(module), tempfile.TemporaryDirectory(prefix="oamipc-export-") as scratch:
        outputs = _run_torch(module, inputs, where=f"exporting {dest}")
        names = _Names.of(inputs, outputs, dynamic_batch=dynamic_batch)
        tmp = Path(scratch) / "model.onnx"
        for name in order:
            run = _export_torchscript if name == "torchscript" else _export_dynamo
            try:
                run(module, inputs, tmp, names, opset)
            except Exception as exc:
                failed.append((name, _why(exc)))
                if name != order[-1]:
                    log.info("the %s ONNX exporter failed (%s); trying %s", name, failed[-1][1],
                             order[order.index(name) + 1])
                    for leftover in Path(scratch).iterdir():  # start the next one from an empty directory
                        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
                    continue
                if len(failed) == 1:
                    raise ExportError(f"{name} ONNX export to {dest} failed: {failed[0][1]}; "
                                      f"try exporter={_other(name)!r} or simplify the offending op") from exc
                said = "; ".join(f"{e}: {why}" for e, why in failed)
                raise ExportError(f"ONNX export to {dest} failed with every exporter ({said}); "
                                  "simplify the offending op") from exc
            used = name
            break
        _check_exported(Path(scratch), tmp, dest, dynamic_batch=dynamic_batch)
        with atomic_output(dest) as out:
            shutil.copyfile(tmp, out)
    log.info("exported %s (%s exporter, %d bytes)", dest, used, dest.stat().st_size)
    return Exported(dest, used, tuple(failed))


@dataclass(frozen=True)
class _Names:
    """ONNX names of the inputs and outputs, and those whose dim 0 is the dynamic batch."""

    inputs: list[str]
    outputs: list[str]
    batched: list[str]

    @classmethod
    def of(cls, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], *, dynamic_batch: bool) -> _Names:
        ins, outs = input_names(len(inputs)), output_names(len(outputs))
        tensors = [*inputs, *outputs]
        batched = [n for n, t in zip(ins + outs, tensors) if t.dim() > 0] if dynamic_batch else []
        return cls(ins, outs, batched)


def _export_torchscript(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], tmp: Path, names: _Names,
                        opset: int | None) -> None:
    """The legacy tracing exporter: fast, and mature for the layers a pruner produces."""
    axes = {name: {0: BATCH} for name in names.batched} or None
    with _quiet(), _native_stdout_to_debug_log():
        torch.onnx.export(module, inputs, str(tmp), dynamo=False, input_names=names.inputs,
                          output_names=names.outputs, opset_version=opset, dynamic_axes=axes,
                          do_constant_folding=True)


def _export_dynamo(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], tmp: Path, names: _Names,
                   opset: int | None) -> None:
    """The ``torch.export`` based exporter; one shared ``batch`` symbol makes dim 0 dynamic.

    It needs the package ``onnxscript`` (a dependency of oamipc); an install that lacks it is
    said plainly rather than surfacing as a bare ``ModuleNotFoundError`` from deep inside torch.
    """
    if importlib.util.find_spec("onnxscript") is None:
        raise ModuleNotFoundError("the dynamo exporter needs the package onnxscript: "
                                  "pip install onnxscript (a dependency of oamipc that this install lacks)")
    kwargs: dict[str, Any] = {}
    params = inspect.signature(torch.onnx.export).parameters
    if "external_data" in params:  # keep the weights inside the one file
        kwargs["external_data"] = False
    if "artifacts_dir" in params:  # any report goes to the scratch directory, never the cwd
        kwargs["artifacts_dir"] = str(tmp.parent)
    if names.batched:
        batch = torch.export.Dim(BATCH, min=1)
        kwargs["dynamic_shapes"] = tuple({0: batch} if n in names.batched else None for n in names.inputs)
    with _quiet():
        torch.onnx.export(module, inputs, str(tmp), dynamo=True, verbose=False, input_names=names.inputs,
                          output_names=names.outputs, opset_version=opset, **kwargs)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Route the exporters' warnings and log chatter to this module's debug log."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    for w in caught:
        log.debug("exporter warning (%s): %s", w.category.__name__, first_line(w.message))


@contextlib.contextmanager
def _native_stdout_to_debug_log() -> Iterator[None]:
    """Send what native code writes to file descriptor 1 during the block to the debug log.

    On an op it cannot export, the torchscript exporter prints its whole IR graph to stdout from
    C++ (its ONNX log is switched on whatever ``verbose`` says), hundreds of lines before an error
    that is reported anyway.  Where fd 1 cannot be redirected, nothing is.
    """
    try:
        saved = os.dup(1)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as sink:
        if sys.stdout is not None:
            sys.stdout.flush()
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            if sys.stdout is not None:
                sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace").strip()
            if text:
                log.debug("torchscript exporter output:\n%s", text)


def _why(exc: BaseException) -> str:
    """One line saying why an exporter failed: the innermost cause (dynamo wraps the op it could not
    convert in two layers of advice), without torch's request to file an issue."""
    seen: set[int] = set()
    inner = exc
    while (inner.__cause__ is not None) and id(inner) not in seen:
        seen.add(id(inner))
        inner = inner.__cause__
    line = first_line(inner) or first_line(exc)
    return line.split(" Please feel free to request support")[0].strip()


def _check_exported(scratch: Path, tmp: Path, dest: Path, *, dynamic_batch: bool) -> None:
    """Reject a side data file and a batch dimension that came out fixed."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    extra = sorted(p.name for p in scratch.iterdir() if p != tmp)
    if not tmp.is_file():
        raise ExportError(f"ONNX export to {dest} produced no file; report this with the model")
    model = onnx.load(str(tmp), load_external_data=False)
    if extra or any(uses_external_data(t) for t in model.graph.initializer):
        raise ExportError(f"ONNX export to {dest} wrote external data ({', '.join(extra) or 'referenced'}): the "
                          "model exceeds ONNX's 2 GiB single-file limit; prune it further before exporting")
    if not dynamic_batch:
        return
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param != BATCH:
            fixed = dims[0].dim_value if dims[0].HasField("dim_value") else dims[0].dim_param
            raise ExportError(f"ONNX export to {dest}: dim 0 of input {value.name!r} came out as {fixed!r}, not a "
                              "dynamic batch: the model hard-codes its batch size (e.g. view(N, -1)); use "
                              "x.size(0) or flatten in the model, or export with dynamic_batch=False")
    for value in model.graph.output:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param != BATCH:
            log.warning("ONNX export to %s: dim 0 of output %r is %r, not the batch", dest, value.name,
                        dims[0].dim_param or dims[0].dim_value)


def _other(exporter: str) -> str:
    return "dynamo" if exporter == "torchscript" else "torchscript"


def onnx_size_bytes(path: str | Path) -> int:
    """Size of an ONNX file in bytes (our files are self-contained: no external data to add)."""
    p = Path(path)
    if not p.is_file():
        raise LoadError(f"ONNX file {p} not found: check the path")
    return p.stat().st_size


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    """How closely onnxruntime reproduces the torch module.

    ``max_abs_err``: the largest ``|onnx - torch|`` over every output element of every batch.
    ``max_rel_err``: per output and batch, ``max |onnx - torch|`` divided by ``max |torch|`` of
    that output (the output's scale, not each element's value, so entries near zero do not blow
    it up); the largest of these.  An output whose reference is all zeros uses the absolute error.
    ``passed``: every output of every batch satisfied
    ``max |onnx - torch| <= atol + rtol * max |torch|``.
    ``n_checked``: the number of batches compared; ``batch_sizes``: their sizes, in order (the
    given batches first, then the random ones).
    """

    max_abs_err: float
    max_rel_err: float
    n_checked: int
    batch_sizes: tuple[int, ...]
    passed: bool
    rtol: float
    atol: float
    provider: str

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable data."""
        data = asdict(self)
        data["batch_sizes"] = list(self.batch_sizes)
        return data


Batch = tuple[torch.Tensor, ...]


def verify_onnx(path: str | Path, module: torch.nn.Module,
                inputs: Sequence[torch.Tensor | Sequence[torch.Tensor]] | torch.Tensor, *,
                rtol: float = 1e-4, atol: float = 1e-5, extra_random: int = 2, seed: int = 0) -> VerifyResult:
    """Check the ONNX file, run it with onnxruntime (CPU) and compare with ``module`` under no_grad.

    ``inputs``: the batches to compare on (e.g. calibration data).  Either one call's arguments
    (a tensor, or a tuple with one tensor per model input) or a sequence of batches, each a
    tensor (one-input models) or a tuple of tensors.  ``extra_random`` more batches of seeded
    random data with the shapes of the first batch but a different batch size (3, then 1, ...)
    prove that the batch dimension really is dynamic; a file exported with a fixed batch gets
    random batches of that fixed size instead.  Raises :class:`ExportError` when the file fails
    the ONNX checker, onnxruntime cannot run it, or the outputs differ beyond tolerance.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise LoadError(f"ONNX file {path} not found: check the path")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"{path} fails the ONNX checker: {first_line(exc)}; re-export the model") from exc
    session, provider = make_session(path, device="cpu", intra_op_threads=None)
    meta = session.get_inputs()
    batches = _as_batches(inputs, len(meta), path)
    fixed = meta[0].shape[0] if meta[0].shape and isinstance(meta[0].shape[0], int) else None
    extra = _random_batches(batches[0], extra_random, seed, fixed_batch=fixed,
                            taken={_batch_size(b) for b in batches})
    names = [m.name for m in meta]

    max_abs = max_rel = 0.0
    passed = True
    sizes = []
    with eval_mode(module), torch.no_grad():
        for i, batch in enumerate(batches + extra):
            size = _batch_size(batch)
            sizes.append(size)
            hint = _FIXED_BATCH_HINT if i >= len(batches) else "check the input shapes"
            where = f"verifying {path} at batch size {size}"
            expected = _run_torch(module, batch, where=where, hint=hint)
            try:
                got = session.run(None, {name: t.detach().cpu().numpy() for name, t in zip(names, batch)})
            except Exception as exc:
                raise ExportError(f"onnxruntime fails while {where}: {first_line(exc)}; {hint}") from exc
            for abs_err, scale in _compare(path, expected, got, size):
                max_abs = max(max_abs, abs_err)
                max_rel = max(max_rel, abs_err / scale if scale > 0 else abs_err)
                passed = passed and abs_err <= atol + rtol * scale
    result = VerifyResult(max_abs_err=max_abs, max_rel_err=max_rel, n_checked=len(sizes),
                          batch_sizes=tuple(sizes), passed=passed, rtol=rtol, atol=atol, provider=provider)
    if not passed:
        raise ExportError(f"{path} disagrees with the torch module: max abs err {max_abs:.3e}, max rel err "
                          f"{max_rel:.3e} exceed atol {atol:g} + rtol {rtol:g} x max|output| (batch sizes "
                          f"{list(sizes)}); try the other exporter, or check that the module is the one exported")
    log.info("verified %s: max abs err %.2e, max rel err %.2e over %d batches", path, max_abs, max_rel, len(sizes))
    return result


def _compare(path: Path, expected: list[torch.Tensor], got: list[Any], size: int) -> list[tuple[float, float]]:
    """(max abs error, max |reference|) per output of one batch; structural mismatches raise."""
    if len(got) != len(expected):
        raise ExportError(f"{path} has {len(got)} outputs but the torch module returns {len(expected)}; "
                          "re-export it from this module")
    errors = []
    for name, ref_t, out_a in zip(output_names(len(got)), expected, got):
        ref = ref_t.detach().cpu().to(torch.float64).numpy()
        out = np.asarray(out_a, dtype=np.float64)
        if ref.shape != out.shape:
            raise ExportError(f"output {name} of {path} has shape {list(out.shape)} but torch gives "
                              f"{list(ref.shape)} at batch size {size}; re-export it from this module")
        errors.append(_errors(ref, out))
    return errors


def _errors(ref: np.ndarray, out: np.ndarray) -> tuple[float, float]:
    """(max |out - ref|, max |ref|); a NaN or inf where the reference has none counts as inf error."""
    if ref.size == 0:
        return 0.0, 0.0
    both_nan = np.isnan(ref) & np.isnan(out)
    with np.errstate(invalid="ignore"):
        diff = np.where(both_nan | (ref == out), 0.0, np.abs(out - ref))
    diff = np.nan_to_num(diff, nan=math.inf, posinf=math.inf)
    finite = np.abs(ref[np.isfinite(ref)])
    return float(diff.max()), float(finite.max()) if finite.size else 0.0


def _as_batches(inputs: Any, n_inputs: int, path: Path) -> list[Batch]:
    """Normalise ``inputs`` to a list of batches, each a tuple with one tensor per model input.

    A flat sequence of tensors is one call when it has exactly ``n_inputs`` items, else one
    batch per tensor (a one-input model); this is unambiguous because a batch of one tensor
    cannot feed a model with several inputs.
    """
    if isinstance(inputs, torch.Tensor):
        return [(inputs,)]
    items = list(inputs)
    if not items:
        raise UsageError(f"cannot verify {path}: give at least one input batch")
    if all(isinstance(t, torch.Tensor) for t in items) and len(items) == n_inputs:
        return [tuple(items)]
    batches = [(b,) if isinstance(b, torch.Tensor) else tuple(b) for b in items]
    for b in batches:
        if len(b) != n_inputs or not all(isinstance(t, torch.Tensor) for t in b):
            raise UsageError(f"cannot verify {path}: each batch must hold {n_inputs} tensor(s), one per model input")
    return batches


def _batch_size(batch: Batch) -> int:
    return int(batch[0].shape[0]) if batch[0].dim() > 0 else 1


def _random_batches(template: Batch, n: int, seed: int, *, fixed_batch: int | None, taken: set[int]) -> list[Batch]:
    """``n`` seeded random batches shaped like ``template``, at batch sizes not used yet.

    Floating inputs are drawn with the template's mean and spread, so the errors are measured at
    the scale the model sees; integer inputs within the template's range.
    """
    if fixed_batch is not None:
        sizes = [fixed_batch] * n
    else:
        sizes = [s for s in _RANDOM_BATCH_SIZES if s not in taken][:n]
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for size in sizes:
        batch = []
        for t in template:
            shape = (size, *t.shape[1:]) if t.dim() > 0 else ()
            batch.append(_random_like(t, shape, gen))
        batches.append(tuple(batch))
    return batches


def _random_like(t: torch.Tensor, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if t.dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if not t.is_floating_point():
        lo, hi = (int(t.min()), int(t.max())) if t.numel() else (0, 1)
        return torch.randint(lo, hi + 1, shape, generator=gen, dtype=t.dtype)
    ref = t.detach().cpu().double()
    mean = float(ref.mean()) if ref.numel() else 0.0
    std = float(ref.std()) if ref.numel() > 1 else 1.0
    if not math.isfinite(std) or std == 0.0:
        std = 1.0
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * std + mean).to(t.dtype)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _run_torch(module: torch.nn.Module, inputs: Batch, *, where: str,
               hint: str = "check the input shapes") -> list[torch.Tensor]:
    """Run ``module`` on ``inputs`` (moved to its device) and flatten the outputs to tensors."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    try:
        with torch.no_grad():
            out = module(*(t.to(device) for t in inputs))
    except Exception as exc:
        raise ExportError(f"the torch module fails while {where}: {first_line(exc)}; {hint}") from exc
    return _flatten(out, where)


def _flatten(out: Any, where: str) -> list[torch.Tensor]:
    """Depth-first tensors of a (nested) tuple/list/dict output, the order both exporters use."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _flatten(item, where)]
    if isinstance(out, dict):
        return [t for item in out.values() for t in _flatten(item, where)]
    raise ExportError(f"the torch module returns a {type(out).__name__} while {where}: ONNX outputs must be "
                      "tensors (or tuples, lists, dicts of tensors); return tensors only")
