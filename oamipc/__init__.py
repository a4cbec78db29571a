"""oamipc: make trained PyTorch networks smaller and faster by removing neurons and channels."""

from oamipc.errors import OamipcError

__version__ = "0.1.0"

__all__ = ["OamipcError", "__version__"]
