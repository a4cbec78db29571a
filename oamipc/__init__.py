"""oamipc: make trained PyTorch networks smaller and faster by removing neurons and channels.

Python API::

    import oamipc
    model = oamipc.load_model("examples/digits_cnn.pt")
    result = oamipc.compile(model, torch.randn(1, 1, 8, 8), data=oamipc.load_data("digits"),
                            importance="taylor", flops_budget=0.5)
    oamipc.export_onnx(result.module, result.example_inputs, "small.onnx")
    print(result.report["accuracy"], result.report["after"]["macs"])

The names below are imported on first use (PEP 562), not with the package: importing torch
takes seconds, and the command line's entry point (:mod:`oamipc.launch`) must be able to
answer a Ctrl-C in that time with its one-line message instead of a traceback.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from oamipc.data import Dataset, DataSplits, load_data
    from oamipc.driver import CompileResult, compile  # noqa: A004 - the product's verb, as oamipc.compile
    from oamipc.errors import OamipcError
    from oamipc.export import export_onnx, verify_onnx
    from oamipc.loading import load_model
    from oamipc.plan import Plan
    from oamipc.target import Target

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_HOMES = {
    "Dataset": "oamipc.data", "DataSplits": "oamipc.data", "load_data": "oamipc.data",
    "CompileResult": "oamipc.driver", "compile": "oamipc.driver", "OamipcError": "oamipc.errors",
    "export_onnx": "oamipc.export", "verify_onnx": "oamipc.export", "load_model": "oamipc.loading",
    "Plan": "oamipc.plan", "Target": "oamipc.target",
}

__all__ = [
    "CompileResult", "DataSplits", "Dataset", "OamipcError", "Plan", "Target", "__version__", "compile", "export_onnx",
    "load_data", "load_model", "verify_onnx",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'oamipc' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
