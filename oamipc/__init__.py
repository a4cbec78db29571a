"""oamipc: make trained PyTorch networks smaller and faster by removing neurons and channels.

Python API::

    import oamipc
    model = oamipc.load_model("examples/digits_cnn.pt")
    result = oamipc.compile(model, torch.randn(1, 1, 8, 8), data=oamipc.load_data("digits"),
                            importance="taylor", flops_budget=0.5)
    oamipc.export_onnx(result.module, result.example_inputs, "small.onnx")
    print(result.report["accuracy"], result.report["after"]["macs"])
"""

from oamipc.data import Dataset, DataSplits, load_data
from oamipc.driver import CompileResult, compile  # noqa: A004 - the product's verb, as oamipc.compile
from oamipc.errors import OamipcError
from oamipc.export import export_onnx, verify_onnx
from oamipc.loading import load_model
from oamipc.plan import Plan
from oamipc.target import Target

__version__ = "0.1.0"

__all__ = [
    "CompileResult", "DataSplits", "Dataset", "OamipcError", "Plan", "Target", "__version__", "compile", "export_onnx",
    "load_data", "load_model", "verify_onnx",
]
