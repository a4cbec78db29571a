"""Load a trained model from a file, safely, as an ``nn.Module`` in eval mode.

The format is read from the file's content, never from its extension:

* a ``torch.export`` program (``torch.export.save``, a zip with ``archive_format``): loaded with
  ``torch.export.load`` and turned into one module-level ``fx.GraphModule`` by
  :func:`exported_to_graph_module`, so the rest of oamipc sees the same IR as for a traced model;
* a state dict, or a checkpoint ``{"state_dict": ..., "model_class": ..., "model_args": ...}``:
  read with ``torch.load(weights_only=True)`` and poured into a model built from ``model_class``;
* a whole pickled ``nn.Module`` (``torch.save(model)``): unpickled only with ``trust_pickle``;
* TorchScript (``torch.jit.save``): refused, because torch.fx cannot trace it.

Why so careful: unpickling runs arbitrary code.  A plain ``torch.load`` is never called with
``weights_only=False`` unless the user passed ``--trust-pickle``, and a ``.pt2`` archive (which
``torch.export.load`` partly unpickles, falling back to full pickle on failure) is inspected
first: every pickled payload in it must load with ``weights_only=True``.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import logging
import operator
import os
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from oamipc.errors import LoadError, OamipcError, UsageError

log = logging.getLogger(__name__)

__all__ = ["exported_to_graph_module", "import_object", "load_model"]

# Checkpoint keys under which a training script usually stores the weights.
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
# The only package a checkpoint may name as its own model class (oamipc's shipped examples).
_TRUSTED_CLASS_PREFIX = "oamipc.models:"
_SHOW_KEYS = 3  # how many keys an error message lists


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def load_model(
    path: str | Path,
    *,
    model_class: str | None = None,
    model_args: dict[str, Any] | list[Any] | None = None,
    trust_pickle: bool = False,
) -> nn.Module:
    """Load the model stored at ``path`` and return it in eval mode on the CPU.

    ``model_class`` (``"pkg.module:ClassOrFactory"``) and ``model_args`` (a dict of keyword
    arguments or a list of positional ones) build the model for a state dict; an explicit
    ``model_class`` wins over one named in the checkpoint.  ``trust_pickle`` allows unpickling
    whole modules (and pickled parts of ``.pt2`` archives), which runs code from the file.
    Every failure is a one-line :class:`LoadError`.
    """
    if model_args is not None and not isinstance(model_args, (dict, list, tuple)):
        raise UsageError(
            f"model arguments must be a JSON object (keyword arguments) or a list (positional "
            f"arguments), got a {type(model_args).__name__}; e.g. --model-args '{{\"width\": 16}}'"
        )
    file = Path(path)
    _check_readable(file)
    kind = _archive_kind(file)
    if kind == "torchscript":
        raise LoadError(
            f"{file} is a TorchScript archive (torch.jit.save), which torch.fx cannot trace; "
            f"re-export the model with torch.export.save, or save a state dict with "
            f"torch.save(model.state_dict(), ...) and pass --model-class"
        )
    if kind == "pt2":
        if model_class is not None:
            log.warning("%s is a torch.export program; --model-class %s is ignored", file, model_class)
        model: nn.Module = _load_exported(file, trust_pickle=trust_pickle)
    else:
        obj = _torch_load(file, trust_pickle=trust_pickle)
        model = _model_from_object(obj, file, model_class=model_class, model_args=model_args)
    _check_finite(model.state_dict(), file)
    _check_no_empty_parameters(model, file)
    model.eval()
    log.info("loaded %s from %s", type(model).__name__, file)
    return model


def import_object(spec: str, *, error: type[OamipcError] = LoadError) -> object:
    """The object named by ``"pkg.module:name"`` (``name`` may be dotted: ``Outer.inner``).

    The module part may also be a path to a ``.py`` file (``models/net.py:Net``), which is
    imported under a private module name.  Failures raise ``error`` (the caller's error class:
    a model class is a :class:`LoadError`, a custom data loader a ``DataError``).
    """
    module_part, sep, attr_path = spec.rpartition(":")
    if not sep or not module_part.strip() or not attr_path.strip():
        raise error(
            f"'{spec}' is not an import spec; write it as 'package.module:Name', "
            f"e.g. 'torchvision.models:resnet18' or 'my_models.py:Net'"
        )
    module = _import_module(module_part.strip(), spec, error)
    obj: object = module
    walked = module_part.strip()
    for part in attr_path.strip().split("."):
        if not hasattr(obj, part):
            hint = _public_names(obj)
            raise error(
                f"'{walked}' has no attribute '{part}' (from '{spec}'); "
                f"check the spelling{hint}"
            )
        obj = getattr(obj, part)
        walked = f"{walked}:{part}" if walked == module_part.strip() else f"{walked}.{part}"
    return obj


# --------------------------------------------------------------------------------------------
# Files and formats
# --------------------------------------------------------------------------------------------


def _check_readable(file: Path) -> None:
    """Existence, kind and size checks that give better messages than torch.load."""
    if not file.exists():
        raise LoadError(f"model file {file} does not exist; check the path")
    if file.is_dir():
        raise LoadError(f"{file} is a directory, not a model file; pass the .pt/.pth/.pt2 file in it")
    try:
        size = file.stat().st_size
    except OSError as exc:
        raise LoadError(f"cannot read {file} ({_first_line(exc)}); check its permissions") from exc
    if size == 0:
        raise LoadError(f"{file} is empty (0 bytes); the model was not saved completely, save it again")


def _archive_kind(file: Path) -> str | None:
    """'pt2', 'torchscript' or 'torch' for a readable zip archive, None for anything else."""
    try:
        with zipfile.ZipFile(file) as zf:
            names = zf.namelist()
    except Exception:  # noqa: BLE001 - a damaged directory makes zipfile raise many types
        return None  # legacy torch.save format, or corrupt: torch.load will tell
    inner = {name.split("/", 1)[1] for name in names if "/" in name}
    if "archive_format" in inner:
        return "pt2"
    if "constants.pkl" in inner or any(name.startswith("code/") for name in inner):
        return "torchscript"
    return "torch"


def _torch_load(file: Path, *, trust_pickle: bool) -> object:
    """``torch.load`` with weights only; full unpickling only when the user trusts the file."""
    plain = _is_plain_pickle(file)
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it did not write; the refusal below says more.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _unsafe_global(exc) or ("a plain pickle.dump stream" if plain else None)
        if found is None:
            raise _corrupt(file, exc) from exc
        if not trust_pickle:
            raise LoadError(
                f"{file} holds a pickled Python object ({found}); unpickling runs arbitrary code "
                f"from the file, so it was refused: pass --trust-pickle only if you trust the "
                f"file, or save a state dict instead (torch.save(model.state_dict(), ...))"
            ) from exc
        log.warning("unpickling %s with weights_only=False (--trust-pickle); it needs %s", file, found)
    except Exception as exc:  # noqa: BLE001 - damaged bytes make the unpickler raise anything
        if plain and not trust_pickle:
            raise LoadError(
                f"{file} is a plain Python pickle (pickle.dump), and unpickling runs arbitrary "
                f"code from the file, so it was refused: pass --trust-pickle only if you trust "
                f"the file, or save a state dict instead (torch.save(model.state_dict(), ...))"
            ) from exc
        if not plain:
            raise _corrupt(file, exc) from exc
    try:
        if plain:
            with open(file, "rb") as handle:
                return pickle.load(handle)  # noqa: S301 - the user passed --trust-pickle
        return torch.load(file, map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError, ImportError) as exc:
        raise LoadError(
            f"{file} is a pickle of code that cannot be imported here ({_first_line(exc)}); run "
            f"oamipc where the model's module is importable, or save a state dict instead"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - arbitrary code in a trusted pickle may raise anything
        raise LoadError(f"unpickling {file} failed ({_describe(exc)}); save a state dict instead") from exc


# torch.save's legacy (non-zip) format starts with its pickled magic number.
_LEGACY_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:12]


def _is_plain_pickle(file: Path) -> bool:
    """A ``pickle.dump`` stream (protocol 2+) rather than a torch.save file."""
    with open(file, "rb") as handle:
        head = handle.read(len(_LEGACY_TORCH_MAGIC))
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and head != _LEGACY_TORCH_MAGIC


def _unsafe_global(exc: BaseException) -> str | None:
    """The global a weights-only unpickler refused, or None when the data was just corrupt."""
    text = str(exc)
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if match:
        return match.group(1)
    if "global" in text.lower() and "GLOBAL" in text:
        return "a Python global"
    return None


def _corrupt(file: Path, exc: BaseException) -> LoadError:
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # skip torch's paragraph about weights_only defaults
        reason = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0]
    else:
        reason = _first_line(exc).split(". ")[0]
    if "can't allocate memory" in text or "alloc_cpu" in text:
        return LoadError(
            f"{file} declares tensors too large to allocate ({type(exc).__name__}: {reason}); the "
            f"file is damaged or was not written by torch.save: save the model again"
        )
    return LoadError(
        f"{file} is not a readable PyTorch file (truncated, corrupt or another format: "
        f"{type(exc).__name__}: {reason}); save the model again with "
        f"torch.save(model.state_dict(), ...) or torch.export.save"
    )


# --------------------------------------------------------------------------------------------
# State dicts and pickled modules
# --------------------------------------------------------------------------------------------


def _model_from_object(
    obj: object,
    file: Path,
    *,
    model_class: str | None,
    model_args: dict[str, Any] | list[Any] | None,
) -> nn.Module:
    """A model from what ``torch.load`` returned: a module, a state dict or a checkpoint."""
    if isinstance(obj, nn.Module):
        if model_class is not None:
            log.warning("%s holds a whole model; --model-class %s is ignored", file, model_class)
        return obj
    if not isinstance(obj, Mapping):
        raise LoadError(
            f"{file} is a {type(obj).__name__}, not a model; save the model with "
            f"torch.save(model.state_dict(), ...) or torch.export.save"
        )
    state, own_class, own_args = _split_checkpoint(obj, file)
    spec = model_class
    if spec is None and own_class is not None:
        if not _is_shipped_model(own_class):
            raise LoadError(
                f"{file} names its model class '{own_class}', but importing and calling what a "
                f"file names can run arbitrary code; pass --model-class {own_class} yourself if "
                f"you trust it"
            )
        spec = own_class
    if spec is None:
        example = next(iter(state), "?")
        raise LoadError(
            f"{file} holds a state dict ({len(state)} tensors, e.g. '{example}') but no model "
            f"class; pass --model-class package.module:Class (and --model-args) to build the model"
        )
    args = model_args if model_args is not None else own_args
    _check_finite(state, file)
    model = _instantiate(spec, args, state=state, file=file)
    _fill(model, state, file, spec)
    return model


def _is_shipped_model(spec: str) -> bool:
    """Whether ``spec`` names one of oamipc's own example models, and nothing else.

    The prefix alone is not enough: ``oamipc.models:torch.load`` would call ``torch.load`` with
    arguments chosen by the file.  Only a plain public name of ``oamipc.models`` that is an
    ``nn.Module`` subclass defined there qualifies.
    """
    match = re.fullmatch(re.escape(_TRUSTED_CLASS_PREFIX) + r"([A-Za-z][A-Za-z0-9_]*)", spec)
    if match is None:
        return False
    models = importlib.import_module(_TRUSTED_CLASS_PREFIX.rstrip(":"))
    obj = getattr(models, match.group(1), None)
    public = getattr(models, "__all__", None)
    return (
        isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == models.__name__
        and (public is None or match.group(1) in public)
    )


def _split_checkpoint(
    obj: Mapping[Any, Any], file: Path
) -> tuple[dict[str, Any], str | None, dict[str, Any] | list[Any] | None]:
    """(state dict, model class named by the checkpoint, model args named by it)."""
    for key in _STATE_DICT_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            own_class = obj.get("model_class")
            own_args = obj.get("model_args")
            if own_class is not None and not isinstance(own_class, str):
                raise LoadError(f"{file}: 'model_class' must be a string like 'pkg.module:Name'")
            if own_args is not None and not isinstance(own_args, (dict, list, tuple)):
                raise LoadError(f"{file}: 'model_args' must be a dict or a list")
            return _as_state_dict(inner, file), own_class, own_args
    return _as_state_dict(obj, file), None, None


def _as_state_dict(obj: Mapping[Any, Any], file: Path) -> dict[str, Any]:
    tensors = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
    if not tensors or not all(isinstance(k, str) for k in obj):
        keys = ", ".join(repr(k) for k in list(obj)[:5])
        raise LoadError(
            f"{file} holds a dict (keys {keys or 'none'}) that is not a state dict; expected "
            f"name -> tensor entries, or a checkpoint with a 'state_dict' entry"
        )
    return dict(obj)


def _instantiate(
    spec: str,
    args: dict[str, Any] | list[Any] | tuple[Any, ...] | None,
    *,
    state: dict[str, Any] | None = None,
    file: Path | None = None,
) -> nn.Module:
    """Build a model from a class or factory spec and its arguments.

    The model is first built on PyTorch's meta device, where no memory is allocated and no
    weights are initialised (so the factory runs twice): arguments that declare a model too big
    for this machine (``--model-args '{"hidden": [1000000000000]}'``) fail at once with the
    sizes named, instead of allocating or hanging, and a ``state`` dict (from ``file``) that
    does not fit fails with its mismatches before any real memory is used.  A factory that
    cannot run on the meta device is simply built for real.
    """
    factory = import_object(spec, error=LoadError)
    if not callable(factory):
        raise LoadError(
            f"'{spec}' is {_a(type(factory).__name__)}, not a class or function; pass --model-class "
            f"naming an nn.Module subclass or a function returning one"
        )
    positional = list(args) if isinstance(args, (list, tuple)) else []
    keywords = dict(args) if isinstance(args, dict) else {}
    skeleton = _build_on_meta(factory, positional, keywords)
    if skeleton is not None:
        _check_model_size(skeleton, spec, args)
        if state is not None and file is not None:
            _check_fits(skeleton.state_dict(), state, file, spec)
    try:
        model = factory(*positional, **keywords)
    except Exception as exc:  # noqa: BLE001 - user code may raise anything
        shown = json.dumps(args, default=str) if args is not None else "no arguments"
        raise LoadError(
            f"building the model with '{spec}' and {shown} failed ({_describe(exc)}); "
            f"check --model-args"
        ) from exc
    if not isinstance(model, nn.Module):
        raise LoadError(
            f"'{spec}' returned {_a(type(model).__name__)}, not a torch.nn.Module; pass "
            f"--model-class naming an nn.Module subclass or a function returning one"
        )
    return model


def _build_on_meta(factory: Callable[..., Any], positional: list[Any], keywords: dict[str, Any]) -> nn.Module | None:
    """The model built on the meta device (shapes only, no memory), or None if that fails."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            skeleton = factory(*positional, **keywords)
    except Exception as exc:  # noqa: BLE001 - user code may not run on the meta device; build it for real
        log.debug("cannot build the model on the meta device first (%s); building it directly", _describe(exc))
        return None
    return skeleton if isinstance(skeleton, nn.Module) else None


def _memory_limit() -> int | None:
    """Half of this machine's physical memory in bytes (None where the platform does not say).

    Compiling keeps at least two copies of a model (the original and the pruned one), so a model
    whose parameters and buffers need more than half of the memory cannot be compiled here.
    """
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES")) // 2
    except (AttributeError, ValueError, OSError):
        return None


def _check_model_size(skeleton: nn.Module, spec: str, args: object) -> None:
    """Refuse a model whose tensors would not fit in half of this machine's memory."""
    limit = _memory_limit()
    if limit is None:
        return
    tensors = [(f"parameter '{n}'", t) for n, t in skeleton.named_parameters()]
    tensors += [(f"buffer '{n}'", t) for n, t in skeleton.named_buffers()]
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    if total <= limit:
        return
    what, biggest = max(tensors, key=lambda item: item[1].numel() * item[1].element_size())
    shown = json.dumps(args, default=str) if args is not None else "no arguments"
    raise LoadError(
        f"'{spec}' built with {shown} would need {_bytes(total)} for its weights ({what} alone has "
        f"shape {tuple(biggest.shape)}), more than half of this machine's {_bytes(2 * limit)} of "
        f"memory; check --model-args"
    )


def _bytes(n: int) -> str:
    """``n`` bytes in decimal units: ``512 bytes``, ``4.0 TB``."""
    if n < 1000:
        return f"{n} bytes"
    value = float(n)
    for unit in ("KB", "MB", "GB", "TB"):
        value /= 1000
        if value < 1000:
            return f"{value:.1f} {unit}"
    return f"{value / 1000:.1f} PB"


def _strip_data_parallel(
    state: dict[str, Any], expected: Mapping[str, Any], file: Path, *, announce: bool = True
) -> dict[str, Any]:
    """Drop the ``module.`` prefix that ``nn.DataParallel`` puts on every key, when the model has none."""
    if (
        state and all(k.startswith("module.") for k in state)
        and not any(k.startswith("module.") for k in expected)
    ):
        if announce:
            log.info("stripping the 'module.' prefix (nn.DataParallel) from the keys of %s", file)
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _fill(model: nn.Module, state: dict[str, Any], file: Path, spec: str) -> None:
    """``load_state_dict(strict=True)`` with the mismatches spelled out first."""
    expected = model.state_dict()
    state = _strip_data_parallel(state, expected, file)
    _check_fits(expected, state, file, spec)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise LoadError(f"loading the state dict of {file} into '{spec}' failed ({_describe(exc)})") from exc


def _check_fits(expected: Mapping[str, Any], state: dict[str, Any], file: Path, spec: str) -> None:
    """Missing and unexpected keys, and shapes that differ, as one error naming them all."""
    state = _strip_data_parallel(state, expected, file, announce=False)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and isinstance(state[k], torch.Tensor) and isinstance(v, torch.Tensor)
        and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch (file vs model) {_few(mismatched)}")
    if problems:
        raise LoadError(
            f"the state dict in {file} does not fit '{spec}': {'; '.join(problems)}; check that "
            f"--model-class and --model-args describe the model that was saved"
        )


def _check_finite(state: Mapping[str, Any], file: Path) -> None:
    """Refuse weights holding NaN or Inf: every analysis downstream would be meaningless."""
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            if not bool(torch.isfinite(value).all()):
                bad = int((~torch.isfinite(value)).sum())
                raise LoadError(
                    f"tensor '{name}' in {file} holds {bad} NaN/Inf values; the model diverged "
                    f"or the file is damaged, load a healthy checkpoint"
                )


def _check_no_empty_parameters(model: nn.Module, file: Path) -> None:
    """Refuse zero-size parameters (``nn.Linear(64, 0)``): a layer without units or inputs.

    Such a layer has nothing to prune, and the unit analysis, the ONNX exporters and most
    runtimes do not handle zero-width tensors; saying so here beats a failure deep inside them.
    """
    for name, param in model.named_parameters():
        if param.numel() == 0:
            raise LoadError(
                f"parameter '{name}' in {file} has shape {tuple(param.shape)}, with no elements: "
                f"a layer without units or inputs cannot be pruned or exported; remove that layer "
                f"from the model or give it at least one unit"
            )


# --------------------------------------------------------------------------------------------
# Imports
# --------------------------------------------------------------------------------------------


def _import_module(name: str, spec: str, error: type[OamipcError]) -> Any:
    if name.endswith(".py") or "/" in name or "\\" in name:
        return _import_file(Path(name), spec, error)
    # Like `python -m`, look in the working directory too: `--model-class mynets:Net` should find
    # ./mynets.py even when oamipc runs as an installed console script.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise error(
                f"cannot import module '{name}' for '{spec}': no module named '{exc.name}'; check "
                f"the spelling and that its folder is on PYTHONPATH"
            ) from exc
        raise error(f"importing '{name}' for '{spec}' failed ({_describe(exc)}); install what it needs") from exc
    except Exception as exc:  # noqa: BLE001 - module code may raise anything
        raise error(f"importing '{name}' for '{spec}' failed ({_describe(exc)}); fix that module") from exc


def _import_file(file: Path, spec: str, error: type[OamipcError]) -> Any:
    if not file.is_file():
        raise error(f"'{spec}' names the file {file}, which does not exist; check the path")
    module_name = f"_oamipc_user_{re.sub(r'[^0-9A-Za-z_]', '_', file.stem)}"
    file_spec = importlib.util.spec_from_file_location(module_name, file)
    if file_spec is None or file_spec.loader is None:
        raise error(f"'{spec}': {file} cannot be imported as a Python module; name a .py file")
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    try:
        file_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - module code may raise anything
        sys.modules.pop(module_name, None)
        raise error(f"importing {file} for '{spec}' failed ({_describe(exc)}); fix that file") from exc
    return module


def _public_names(obj: object) -> str:
    names = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
    return f"; it has e.g. {', '.join(names[:5])}" if names else ""


# --------------------------------------------------------------------------------------------
# torch.export programs
# --------------------------------------------------------------------------------------------

# Entries of a .pt2 archive that are read as text or JSON, never unpickled.
_PT2_TEXT_ENTRIES = {
    "archive_format", "archive_version", "byteorder", "version", ".data/version",
    ".data/serialization_id", ".format_version", ".storage_alignment",
}
_PT2_CONFIG_ENTRY = re.compile(r"data/(weights|constants)/[^/]+_(weights|constants)_config\.json")
_PT2_JSON_ENTRY = re.compile(r"models/[^/]+\.json|data/(weights|constants)/[^/]+_config\.json|[^/]+\.json")


def _load_exported(file: Path, *, trust_pickle: bool) -> fx.GraphModule:
    """``torch.export.load`` after checking that it will not unpickle untrusted objects."""
    if not trust_pickle:
        try:
            unsafe = _pt2_pickled_payloads(file)
        except Exception as exc:  # noqa: BLE001 - damaged archives make zipfile/zlib raise many types
            raise LoadError(
                f"{file} is a damaged torch.export archive ({_describe(exc)}); export the model "
                f"again with torch.export.save"
            ) from exc
        if unsafe:
            raise LoadError(
                f"{file} is a torch.export archive holding pickled objects or native code "
                f"({_few(unsafe)}) that torch.export.load would run; pass --trust-pickle only "
                f"if you trust the file, or re-export it with torch.export.save from plain tensors"
            )
    with _TorchExportLog() as torch_log:
        try:
            with open(file, "rb") as handle:
                program = torch.export.load(handle)
        except Exception as exc:  # noqa: BLE001 - the deserializer raises many unrelated types
            raise LoadError(
                f"{file} looks like a torch.export archive but cannot be loaded "
                f"({torch_log.cause() or _describe(exc)}); re-export it with torch.export.save "
                f"from this torch version ({torch.__version__})"
            ) from exc
    return exported_to_graph_module(program)


class _TorchExportLog(logging.Handler):
    """Keeps torch.export.load's own log records off the terminal while it runs.

    When an archive fails to load, torch logs the real cause with its traceback as a warning,
    then tries an older layout and raises a vague "check the warnings above" error.  The records
    are collected here instead (and re-logged at debug level), so the user sees one line that
    names the real cause.
    """

    _LOGGERS = ("torch.export", "torch._export")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._saved: list[tuple[logging.Logger, list[logging.Handler], bool]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> _TorchExportLog:
        for name in self._LOGGERS:
            logger = logging.getLogger(name)
            # torch gives these loggers their own stderr handlers: swap them out, not just add.
            self._saved.append((logger, list(logger.handlers), logger.propagate))
            logger.handlers = [self]
            logger.propagate = False
        return self

    def __exit__(self, *exc: object) -> None:
        for logger, handlers, propagate in self._saved:
            logger.handlers = handlers
            logger.propagate = propagate
        for record in self.records:
            log.debug("torch.export.load: %s", _record_text(record))

    def cause(self) -> str | None:
        """The first exception torch logged while loading, as ``Type: first line``."""
        for record in self.records:
            if record.exc_info and record.exc_info[1] is not None:
                return _describe(record.exc_info[1])
        return None


def _record_text(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # noqa: BLE001 - torch has logged records whose arguments do not match
        return str(record.msg)


def _pt2_pickled_payloads(file: Path) -> list[str]:
    """Archive entries that torch.export.load would unpickle and that are not weights-only safe.

    Fail-closed: anything that is not a known text/JSON entry or a raw tensor payload declared
    ``use_pickle: false`` must load with ``torch.load(weights_only=True)``; custom/opaque
    objects and AOTInductor code are always reported.  Every copy of a duplicated entry is
    checked, since zip readers disagree about which one wins.  Top-level entries (outside the
    archive's folder) are checked too: when the current layout fails to load, torch.export.load
    falls back to an older one made of top-level ``serialized_*.pt`` entries, which it unpickles
    with ``weights_only=False`` if the safe load fails.
    """
    unsafe: list[str] = []
    with zipfile.ZipFile(file) as zf:
        infos = [(info, info.filename.split("/", 1)[1] if "/" in info.filename else info.filename)
                 for info in zf.infolist()]
        raw_payloads, pickled_payloads = _pt2_payloads(zf, infos)
        for info, name in infos:
            if info.is_dir():
                continue
            if name not in pickled_payloads and (
                name in _PT2_TEXT_ENTRIES or name.startswith("extra/") or _PT2_JSON_ENTRY.fullmatch(name)
            ):
                continue
            if name.startswith(("data/aotinductor/", "data/executorch/", "data/mtia")):
                unsafe.append(name)
            elif name in raw_payloads:
                continue
            elif name.rsplit("/", 1)[-1].startswith(("custom_obj_", "opaque_obj_")):
                unsafe.append(name)
            elif not _loads_weights_only(zf.read(info)):
                unsafe.append(name)
    return unsafe


def _pt2_payloads(
    zf: zipfile.ZipFile, infos: list[tuple[zipfile.ZipInfo, str]]
) -> tuple[set[str], set[str]]:
    """(entries declared raw tensor bytes only, entries that some config has unpickled).

    An entry that any config entry marks ``use_pickle`` is not raw, whatever the others say.
    """
    raw: set[str] = set()
    pickled: set[str] = set()
    for info, name in infos:
        match = _PT2_CONFIG_ENTRY.fullmatch(name)
        if not match:
            continue
        try:
            config = json.loads(zf.read(info)).get("config", {})
        except (ValueError, AttributeError):
            continue  # unparsable: its payloads stay unknown and get checked
        folder = f"data/{match.group(1)}/"
        for meta in config.values() if isinstance(config, dict) else ():
            path_name = meta.get("path_name") if isinstance(meta, dict) else None
            if not isinstance(path_name, str):
                continue
            if meta.get("use_pickle") is False and path_name.startswith(("weight_", "tensor_")):
                raw.add(folder + path_name)
            else:
                pickled.add(folder + path_name)
    return raw - pickled, pickled


def _loads_weights_only(data: bytes) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not provably safe"
        return False
    return True


@dataclass
class _Lift:
    """One parametric ATen call to be replaced by a ``call_module`` node."""

    node: fx.Node  # the ATen call
    output: fx.Node  # the node whose value the module produces (node, or its getitem 0)
    input: fx.Node
    module: nn.Module
    params: dict[str, fx.Node]  # module attribute -> get_attr node in the source graph
    absorbed: set[fx.Node] = field(default_factory=set)  # nodes that disappear with the lift
    target: str = ""


def exported_to_graph_module(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """One module-level GraphModule computing what the exported program computes.

    Parametric ATen calls (linear, conv1d/2d and non-transposed convolution, eval-mode batch
    norm, layer norm, group norm, and the ``addmm``/``mm`` of a decomposed linear) become
    ``call_module`` nodes of ``nn.Linear``/``nn.Conv1d``/... holding the program's own
    parameters; a module is named after its parameters' prefix (``features.0.weight`` ->
    ``features.0``), or that prefix with dots as underscores where the name is taken.  All other
    ops stay ATen ``call_function`` nodes.  Plain positional inputs get a plain ``forward``
    signature and the original output structure (tensor, tuple, dict).
    """
    source = ep.module()
    graph = source.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards_fn") and not node.users:
            graph.erase_node(node)  # input guards of the exported signature: not part of the model
    graph.eliminate_dead_code()

    lifts = _find_lifts(source)
    gm = _rebuild(source, lifts)
    log.info(
        "lifted %d parametric ATen ops of the exported program into modules (%s)",
        len(lifts), ", ".join(sorted({type(lift.module).__name__ for lift in lifts})) or "none",
    )
    return gm


# ---- matching -------------------------------------------------------------------------------

_aten = torch.ops.aten


def _bound(node: fx.Node) -> dict[str, Any]:
    """The call's arguments by schema name, defaults filled in."""
    schema = node.target._schema  # type: ignore[union-attr]
    bound: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        else:
            bound[arg.name] = arg.default_value if arg.has_default_value() else None
    return bound


def _tensor_attr(source: fx.GraphModule, value: Any) -> torch.Tensor | None:
    """The tensor behind a get_attr node, or None for anything else."""
    if not isinstance(value, fx.Node) or value.op != "get_attr":
        return None
    obj = _fetch(source, str(value.target))
    return obj if isinstance(obj, torch.Tensor) else None


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _rank(node: Any) -> int | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _ntuple(value: Any, n: int) -> tuple[int, ...] | str:
    if isinstance(value, str):
        return value
    values = tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return values * n if len(values) == 1 and n > 1 else values


def _only_getitem0(node: fx.Node) -> fx.Node | None:
    """The single ``getitem(node, 0)`` user of a tuple-returning op, if that is its only use."""
    users = list(node.users)
    if len(users) == 1 and users[0].target is operator.getitem and users[0].args[1] == 0:
        return users[0]
    return None


def _find_lifts(source: fx.GraphModule) -> list[_Lift]:
    """Every liftable call in graph order; a weight shared by unlike calls is lifted once."""
    lifts: list[_Lift] = []
    seen: dict[tuple[str, ...], _Lift] = {}
    for node in source.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        lift = _match(source, node)
        if lift is None:
            continue
        key = tuple(f"{a}={n.target}" for a, n in sorted(lift.params.items()))
        earlier = seen.get(key)
        if earlier is not None:
            if repr(earlier.module) != repr(lift.module):
                log.info("not lifting %s: its weights are shared with a differently configured %s",
                         node.name, earlier.node.name)
                continue
            lift.module = earlier.module  # the same layer called twice
        seen[key] = lift
        lifts.append(lift)
    return lifts


def _match(source: fx.GraphModule, node: fx.Node) -> _Lift | None:
    packet = node.target.overloadpacket  # type: ignore[union-attr]
    matcher = _MATCHERS.get(packet)
    if matcher is None:
        return None
    try:
        return matcher(source, node)
    except (TypeError, ValueError, IndexError) as exc:  # an unusual call: leave it as ATen
        log.debug("not lifting %s: %s", node.name, exc)
        return None


def _params(source: fx.GraphModule, **values: Any) -> dict[str, fx.Node] | None:
    """get_attr nodes of the named tensors; None if one is neither absent nor a get_attr."""
    found: dict[str, fx.Node] = {}
    for name, value in values.items():
        if value is None:
            continue
        if _tensor_attr(source, value) is None:
            return None
        found[name] = value
    return found


def _lift_linear(source: fx.GraphModule, node: fx.Node) -> _Lift | None:
    args = _bound(node)
    params = _params(source, weight=args["weight"], bias=args["bias"])
    weight = _tensor_attr(source, args["weight"])
    if params is None or weight is None or weight.dim() != 2:
        return None
    module = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in params, device="meta")
    return _Lift(node, node, args["input"], module, params, {node})


def _lift_addmm(source: fx.GraphModule, node: fx.Node) -> _Lift | None:
    """``addmm(bias, x, permute(W, [1, 0]))`` and ``mm(x, t(W))``: a decomposed linear."""
    if node.target not in (_aten.addmm.default, _aten.mm.default):
        return None
    args = _bound(node)
    if args.get("beta", 1) != 1 or args.get("alpha", 1) != 1:
        return None
    transposed = args["mat2"]
    if not isinstance(transposed, fx.Node) or len(transposed.users) != 1:
        return None
    is_t = transposed.target in (_aten.t.default, _aten.numpy_T.default)
    is_perm = transposed.target is _aten.permute.default and list(transposed.args[1]) == [1, 0]
    if not (is_t or is_perm):
        return None
    weight_node = transposed.args[0]
    weight = _tensor_attr(source, weight_node)
    if node.target is _aten.mm.default:
        x, bias_node = args["self"], None
    else:
        x, bias_node = args["mat1"], args["self"]
    params = _params(source, weight=weight_node, bias=bias_node)
    if params is None or weight is None or weight.dim() != 2 or _rank(x) != 2:
        return None
    if bias_node is not None:
        bias = _tensor_attr(source, bias_node)
        if bias is None or tuple(bias.shape) != (weight.shape[0],):
            return None
    module = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in params, device="meta")
    return _Lift(node, node, x, module, params, {node, transposed})


def _lift_conv(source: fx.GraphModule, node: fx.Node) -> _Lift | None:
    args = _bound(node)
    if args.get("transposed"):
        return None
    if "output_padding" in args and any(int(p) for p in args["output_padding"]):
        return None
    params = _params(source, weight=args["weight"], bias=args["bias"])
    weight = _tensor_attr(source, args["weight"])
    if params is None or weight is None or weight.dim() not in (3, 4):
        return None
    dims = weight.dim() - 2
    cls: type[nn.Module] = nn.Conv1d if dims == 1 else nn.Conv2d
    groups = int(args["groups"])
    module = cls(
        weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
        stride=_ntuple(args["stride"], dims), padding=_ntuple(args["padding"], dims),
        dilation=_ntuple(args["dilation"], dims), groups=groups, bias="bias" in params,
        device="meta",
    )
    return _Lift(node, node, args["input"], module, params, {node})


def _lift_batch_norm(source: fx.GraphModule, node: fx.Node) -> _Lift | None:
    args = _bound(node)
    if args.get("training"):
        log.warning("batch norm %s uses batch statistics in the exported program (exported in "
                    "training mode?); it stays an ATen op: re-export after model.eval()", node.name)
        return None
    output = node
    if node.target is not _aten.batch_norm.default:
        found = _only_getitem0(node)
        if found is None:
            return None
        output = found
    params = _params(source, weight=args["weight"], bias=args["bias"],
                     running_mean=args["running_mean"], running_var=args["running_var"])
    mean = _tensor_attr(source, args["running_mean"])
    if params is None or mean is None or "running_var" not in params:
        return None
    if ("weight" in params) != ("bias" in params):
        return None
    rank = _rank(args["input"])
    if rank in (2, 3):
        cls: type[nn.Module] = nn.BatchNorm1d
    elif rank == 4:
        cls = nn.BatchNorm2d
    else:
        return None
    module = cls(mean.shape[0], eps=float(args["eps"]), momentum=float(args["momentum"]),
                 affine="weight" in params, device="meta")
    return _Lift(node, output, args["input"], module, params, {node, output})


def _lift_layer_norm(source: fx.GraphModule, node: fx.Node) -> _Lift | None:
    args = _bound(node)
    output = node if node.target is _aten.layer_norm.default else _only_getitem0(node)
    params = _params(source, weight=args["weight"], bias=args["bias"])
    if output is None or params is None or "weight" not in params:
        return None
    shape = [int(s) for s in args["normalized_shape"]]
    module = nn.LayerNorm(shape, eps=float(args["eps"]), bias="bias" in params, device="meta")
    return _Lift(node, output, args["input"], module, params, {node, output})


def _lift_group_norm(source: fx.GraphModule, node: fx.Node) -> _Lift | None:
    args = _bound(node)
    if node.target is _aten.group_norm.default:
        output: fx.Node | None = node
        groups = int(args["num_groups"])
    else:
        output = _only_getitem0(node)
        groups = int(args["group"])
    params = _params(source, weight=args["weight"], bias=args["bias"])
    weight = _tensor_attr(source, args["weight"])
    if output is None or params is None or weight is None or "bias" not in params:
        return None
    module = nn.GroupNorm(groups, weight.shape[0], eps=float(args["eps"]), device="meta")
    return _Lift(node, output, args["input"], module, params, {node, output})


_MATCHERS: dict[Any, Callable[[fx.GraphModule, fx.Node], _Lift | None]] = {
    _aten.linear: _lift_linear,
    _aten.addmm: _lift_addmm,
    _aten.mm: _lift_addmm,
    _aten.conv1d: _lift_conv,
    _aten.conv2d: _lift_conv,
    _aten.convolution: _lift_conv,
    _aten.batch_norm: _lift_batch_norm,
    _aten._native_batch_norm_legit_no_training: _lift_batch_norm,
    _aten.native_batch_norm: _lift_batch_norm,
    _aten.layer_norm: _lift_layer_norm,
    _aten.native_layer_norm: _lift_layer_norm,
    _aten.group_norm: _lift_group_norm,
    _aten.native_group_norm: _lift_group_norm,
}


# ---- rebuilding -----------------------------------------------------------------------------


def _rebuild(source: fx.GraphModule, lifts: list[_Lift]) -> fx.GraphModule:
    """Copy the graph with each lift as a call_module node, then build the new GraphModule."""
    absorbed = set().union(*(lift.absorbed for lift in lifts)) if lifts else set()
    dropped = {
        n for n in source.graph.nodes
        if n.op == "get_attr" and n.users and all(u in absorbed for u in n.users)
    }
    remaining = [str(n.target) for n in source.graph.nodes if n.op == "get_attr" and n not in dropped]
    kept_modules = [str(n.target) for n in source.graph.nodes if n.op == "call_module"]
    _name_lifts(source, lifts, remaining + kept_modules)

    graph, simple = fx.Graph(), _plain_inputs(source)
    if not simple:
        graph._codegen = source.graph._codegen  # keep the pytree input/output handling
    env: dict[fx.Node, fx.Node] = {}
    by_node = {lift.node: lift for lift in lifts}
    for node in source.graph.nodes:
        if node in dropped or (node in absorbed and node not in by_node):
            continue
        lift = by_node.get(node)
        if lift is not None:
            new = graph.call_module(lift.target, (env[lift.input],))
            new.meta.update(_kept_meta(node))
            env[lift.output] = new
            continue
        if node.op == "output" and simple:
            flat = node.args[0]
            out_spec = source.graph._codegen.pytree_info.out_spec  # type: ignore[attr-defined]
            graph.output(pytree.tree_unflatten([env[n] if isinstance(n, fx.Node) else n for n in flat], out_spec))
            continue
        new = graph.node_copy(node, lambda n: env[n])
        new.meta = _kept_meta(node)
        env[node] = new

    root: dict[str, Any] = {}
    for lift in lifts:
        root[lift.target] = _materialise(source, lift)
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module") and node.target not in root:
            root[str(node.target)] = _fetch(source, str(node.target))
    gm = fx.GraphModule(root, graph, class_name=_class_name(source))
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


def _plain_inputs(source: fx.GraphModule) -> bool:
    """Whether the exported signature is plain positional tensors (no nesting, no kwargs)."""
    info = getattr(source.graph._codegen, "pytree_info", None)
    if info is None:
        return False
    placeholders = [n for n in source.graph.nodes if n.op == "placeholder"]
    expected = pytree.tree_structure((tuple(range(len(placeholders))), {}))
    return bool(info.in_spec == expected)


def _kept_meta(node: fx.Node) -> dict[str, Any]:
    """Provenance worth keeping; fake tensors ('val') would go stale and slow deep copies."""
    return {k: node.meta[k] for k in ("stack_trace", "nn_module_stack", "source_fn_stack") if k in node.meta}


def _class_name(source: fx.GraphModule) -> str:
    for node in source.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            path, qualified = next(iter(stack.values()))
            name = str(qualified).rsplit(".", 1)[-1]
            if not path and name.isidentifier():
                return name
    return "ExportedModule"


def _materialise(source: fx.GraphModule, lift: _Lift) -> nn.Module:
    """Give the meta-device module of a lift the program's own tensors."""
    module = lift.module
    if not any(p.is_meta for p in module.parameters()) and not any(b.is_meta for b in module.buffers()):
        return module  # shared with an earlier lift, already filled
    for attr, node in lift.params.items():
        tensor = _fetch(source, str(node.target))
        if attr in ("weight", "bias"):
            value = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)
            setattr(module, attr, value)
        else:
            setattr(module, attr, tensor)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        owner_name = str(lift.params["running_mean"].target).rpartition(".")[0]
        try:
            count = _fetch(source, f"{owner_name}.num_batches_tracked") if owner_name else None
        except AttributeError:
            count = None
        module.num_batches_tracked = (
            count if isinstance(count, torch.Tensor) else torch.tensor(0, dtype=torch.long)
        )
    module.eval()
    return module


def _name_lifts(source: fx.GraphModule, lifts: list[_Lift], taken_paths: list[str]) -> None:
    """Deterministic module names: the parameters' common prefix when it is free, else flat."""
    taken = set(taken_paths)
    firsts = {p.split(".")[0] for p in taken}
    by_module: dict[int, str] = {}
    for lift in lifts:
        if id(lift.module) in by_module:
            lift.target = by_module[id(lift.module)]
            continue
        prefix = _common_prefix(lift)
        if prefix and _free(prefix, lift, taken, source):
            name = prefix
        else:
            base = (prefix or lift.node.name).replace(".", "_")
            if hasattr(fx.GraphModule, base) or not base.isidentifier():
                base = f"m_{base}"
            name, i = base, 1
            while name in firsts or any(t == name or t.startswith(name + ".") for t in taken):
                name, i = f"{base}_{i}", i + 1
        lift.target = name
        by_module[id(lift.module)] = name
        taken.add(name)
        firsts.add(name.split(".")[0])


def _common_prefix(lift: _Lift) -> str | None:
    prefixes = set()
    for attr, node in lift.params.items():
        owner, _, leaf = str(node.target).rpartition(".")
        if leaf != attr:
            return None
        prefixes.add(owner)
    return prefixes.pop() if len(prefixes) == 1 else None


def _free(prefix: str, lift: _Lift, taken: set[str], source: fx.GraphModule) -> bool:
    """Whether ``prefix`` can hold the lifted module without hiding anything else."""
    parts = prefix.split(".")
    if hasattr(fx.GraphModule, parts[0]) or not all(p.isidentifier() or p.isdigit() for p in parts):
        return False
    own = {f"{prefix}.{attr}" for attr in lift.params}
    for attr, node in lift.params.items():
        tensor = _fetch(source, str(node.target))
        if f"{prefix}.{attr}" in taken and attr in ("weight", "bias") and not isinstance(tensor, nn.Parameter):
            return False  # still read elsewhere as a plain tensor: it cannot become a parameter
    for path in taken:
        if prefix.startswith(path + "."):
            return False  # would nest the module inside another lifted module or tensor
        if path == prefix or path.startswith(prefix + "."):
            if path not in own:
                return False
    return True


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1].lower() in "aeiou" else f"a {noun}"


def _few(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW_KEYS])
    more = len(items) - _SHOW_KEYS
    return f"{shown} (+{more} more)" if more > 0 else shown

