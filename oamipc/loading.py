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

This module is the entry point only: :func:`load_model` tells the kinds apart and hands each to
its owner.  Reading bytes safely is :mod:`oamipc.safe_load`; building a model for a state dict
(and the checks every loaded model passes) is :mod:`oamipc.checkpoint`; turning a program's
ATen graph into modules is :mod:`oamipc.lifting`.  :func:`exported_to_graph_module` and
:func:`import_object` are re-exported here for the callers that import them from this module.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from oamipc.checkpoint import check_finite, check_no_empty_parameters, import_object, model_from_object
from oamipc.errors import LoadError, UsageError
from oamipc.lifting import exported_to_graph_module
from oamipc.safe_load import archive_kind, check_readable, read_exported, torch_load

log = logging.getLogger(__name__)

__all__ = ["exported_to_graph_module", "import_object", "load_model"]


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
    check_readable(file)
    kind = archive_kind(file)
    if kind == "torchscript":
        raise LoadError(
            f"{file} is a TorchScript archive (torch.jit.save), which torch.fx cannot trace; "
            f"re-export the model with torch.export.save, or save a state dict with "
            f"torch.save(model.state_dict(), ...) and pass --model-class"
        )
    if kind == "pt2":
        if model_class is not None:
            log.warning("%s is a torch.export program; --model-class %s is ignored", file, model_class)
        model: nn.Module = exported_to_graph_module(read_exported(file, trust_pickle=trust_pickle))
    else:
        obj = torch_load(file, trust_pickle=trust_pickle)
        model = model_from_object(obj, file, model_class=model_class, model_args=model_args)
    check_finite(model.state_dict(), file)
    check_no_empty_parameters(model, file)
    model.eval()
    log.info("loaded %s from %s", type(model).__name__, file)
    return model
