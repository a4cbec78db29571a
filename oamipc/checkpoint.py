"""Build a model for a state dict: import its class, check the build, fit the weights.

A state dict holds weights but not the code that uses them; the model is built from a class or
factory named ``"pkg.module:Name"`` (:func:`import_object`), given by the user
(``--model-class``, ``--model-args``) or by the checkpoint itself when it names one of oamipc's
own example models (importing and calling anything else a file names could run arbitrary code).
Before the real build, the model is built on PyTorch's meta device: arguments that declare a
model too big for this machine's memory, and weights that do not fit the model (missing or
unexpected keys, other shapes), fail at once with every mismatch named.  Weights with NaN/Inf
(:func:`check_finite`) and layers without units (:func:`check_no_empty_parameters`) are refused
for any model, however it was loaded.  Reading the file safely is :mod:`oamipc.safe_load`'s job.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oamipc.errors import LoadError, OamipcError, describe, first_few

__all__ = ["check_finite", "check_no_empty_parameters", "import_object", "model_from_object"]

log = logging.getLogger("oamipc.loading")  # one logger for all of loading: the name users see and filter on

_LINE = 200  # longest quote of a wrapped exception in a message
# Checkpoint keys under which a training script usually stores the weights.
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
# The only package a checkpoint may name as its own model class (oamipc's shipped examples).
_TRUSTED_CLASS_PREFIX = "oamipc.models:"


# --------------------------------------------------------------------------------------------
# State dicts and pickled modules
# --------------------------------------------------------------------------------------------


def model_from_object(
    obj: object,
    file: Path,
    *,
    model_class: str | None,
    model_args: dict[str, Any] | list[Any] | tuple[Any, ...] | None,
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
    check_finite(state, file)
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
) -> tuple[dict[str, Any], str | None, dict[str, Any] | list[Any] | tuple[Any, ...] | None]:
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
    except Exception as exc:
        shown = json.dumps(args, default=str) if args is not None else "no arguments"
        raise LoadError(
            f"building the model with '{spec}' and {shown} failed ({describe(exc, limit=_LINE)}); "
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
        log.debug("cannot build the model on the meta device first (%s); building it directly",
                  describe(exc, limit=_LINE))
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
    tensors: list[tuple[str, torch.Tensor]] = [(f"parameter '{n}'", t) for n, t in skeleton.named_parameters()]
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


def _a(noun: str) -> str:
    """``noun`` with its indefinite article: ``a list``, ``an int``."""
    return f"an {noun}" if noun[:1].lower() in "aeiou" else f"a {noun}"


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
        raise LoadError(
            f"loading the state dict of {file} into '{spec}' failed ({describe(exc, limit=_LINE)})"
        ) from exc


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
        problems.append(f"missing keys {first_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {first_few(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch (file vs model) {first_few(mismatched)}")
    if problems:
        raise LoadError(
            f"the state dict in {file} does not fit '{spec}': {'; '.join(problems)}; check that "
            f"--model-class and --model-args describe the model that was saved"
        )


def check_finite(state: Mapping[str, Any], file: Path) -> None:
    """Refuse weights holding NaN or Inf: every analysis downstream would be meaningless."""
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            if not bool(torch.isfinite(value).all()):
                bad = int((~torch.isfinite(value)).sum())
                raise LoadError(
                    f"tensor '{name}' in {file} holds {bad} NaN/Inf values; the model diverged "
                    f"or the file is damaged, load a healthy checkpoint"
                )


def check_no_empty_parameters(model: nn.Module, file: Path) -> None:
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
        raise error(
            f"importing '{name}' for '{spec}' failed ({describe(exc, limit=_LINE)}); install what it needs"
        ) from exc
    except Exception as exc:
        raise error(f"importing '{name}' for '{spec}' failed ({describe(exc, limit=_LINE)}); fix that module") from exc


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
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise error(f"importing {file} for '{spec}' failed ({describe(exc, limit=_LINE)}); fix that file") from exc
    return module


def _public_names(obj: object) -> str:
    names = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
    return f"; it has e.g. {', '.join(names[:5])}" if names else ""
