"""The example architectures shipped with oamipc.

These are the networks behind the trained files in ``examples/`` and the paper reproductions:
small enough to train on a CPU in seconds to minutes, and written so that ``torch.fx.symbolic_trace``
sees every layer as its own ``call_module`` node (one ``nn.ReLU`` instance per use, no shared
modules, no data-dependent control flow).  That keeps the unit-group analysis and the pruned
layer names readable (``body.0``, ``features.conv2``, ...).

None of the constructors seed anything: call ``torch.manual_seed`` first when the initial weights
must be reproducible (``examples/train_examples.py`` does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["DigitsCNN", "DigitsMLP", "LeNet5", "PaperMLP"]


def _relu_mlp(in_features: int, hidden: Sequence[int]) -> nn.Sequential:
    """Linear-ReLU pairs ``in_features -> hidden[0] -> ... -> hidden[-1]`` as one Sequential."""
    layers: list[nn.Module] = []
    width = in_features
    for out in hidden:
        if int(out) < 1:
            raise ValueError(f"hidden layer widths must be positive, got {tuple(hidden)}")
        layers += [nn.Linear(width, int(out)), nn.ReLU()]
        width = int(out)
    return nn.Sequential(*layers)


class DigitsMLP(nn.Module):
    """Fully connected ReLU net for scikit-learn's 8x8 digits: (N, 1, 8, 8) -> 10 logits.

    ``flatten -> 64 -> hidden[0] -> ... -> hidden[-1] -> num_classes``; the default is the
    64-128-128-10 net of ``examples/digits_mlp.pt``.
    """

    def __init__(self, hidden: Sequence[int] = (128, 128), num_classes: int = 10) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.body = _relu_mlp(64, hidden)
        self.head = nn.Linear(int(hidden[-1]) if hidden else 64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.flatten(x)))


class DigitsCNN(nn.Module):
    """Small CNN with batch norm for the 8x8 digits: (N, 1, 8, 8) -> 10 logits.

    ``conv(1->16, 3x3) BN ReLU, conv(16->32, 3x3) BN ReLU, maxpool 2, flatten 512, fc 64 ReLU,
    fc 10``.  About 38k parameters (150 kB), so the trained file stays far below 1 MB; the
    batch norms give the pruner conv->BN->ReLU chains to handle.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.pool(self.relu2(self.bn2(self.conv2(x))))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


class PaperMLP(nn.Module):
    """The fully connected ReLU nets of the OAMIP paper, for 28x28 inputs: (N, 1, 28, 28) -> 10.

    ElAraby, Wolf and Carvalho, "Identifying Critical Neurons in ANN Architectures using Mixed
    Integer Programming" (2020), evaluate two fully connected models on MNIST/Fashion-MNIST:

    * FC-3 (:attr:`FC3`, the default): 784-300-100-10, three linear layers;
    * FC-4 (:attr:`FC4`): 784-200-100-100-10, four linear layers.

    The widths follow the authors' published code.  FC-3 has 266k parameters (1.07 MB in float32),
    so the shipped ``examples/fashion_mlp.pt`` uses FC-4 (188k parameters) to stay under 1 MB.
    Inputs of any shape with ``in_features`` elements per sample are flattened first.
    """

    FC3: tuple[int, ...] = (300, 100)
    FC4: tuple[int, ...] = (200, 100, 100)

    def __init__(self, hidden: Sequence[int] = FC3, in_features: int = 784, num_classes: int = 10) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.body = _relu_mlp(in_features, hidden)
        self.head = nn.Linear(int(hidden[-1]) if hidden else in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.flatten(x)))


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling for 28x28 inputs: (N, C, 28, 28) -> ``num_classes``.

    ``conv(C->6, 5x5, pad 2) ReLU pool2, conv(6->16, 5x5) ReLU pool2, flatten 400, fc 120 ReLU,
    fc 84 ReLU, fc num_classes`` -- the modern variant of LeCun et al. (1998) that the OAMIP paper
    also prunes (the padding makes 28x28 inputs behave like the original 32x32 ones).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.flatten(x)))
        return self.fc3(self.relu4(self.fc2(x)))
