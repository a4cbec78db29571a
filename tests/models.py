"""The model zoo: tiny seeded networks that the pruning tests run through the whole pipeline.

Each architecture exercises one or more patterns that a channel-dependency analysis must get
right (residual adds, concatenation, self-concatenation, chunk/split, depthwise and grouped
convolutions, broadcasting gates, hard-coded ``view`` sizes, group and layer norms, ...).  All of
them trace with ``torch.fx.symbolic_trace``, run a forward in milliseconds, use every module
exactly once, keep every prunable layer at 4 units or more, and end in a ``Linear`` classifier
whose outputs are never pruned.

Every class docstring follows one format that ``tests/test_models_zoo.py`` checks against the
traced graph, so the description cannot drift from the code:

- ``Input (N, ...) -> K logits.``: the example input shape and the number of classes;
- ``Modules: Conv2d x2, ReLU x3, ...``: every ``call_module`` node of the traced graph, by type;
- ``Ops: torch.cat, operator.add, .view, ...``: the exact set of ``call_function`` targets
  (``F.`` is ``torch.nn.functional``) and ``call_method`` names (with a leading dot), or ``none``;
- ``Pruning: ...``: free text, the tricks that a channel-pruning analysis must handle.

:func:`build` seeds the weights without touching torch's global random state, and gives every
normalisation layer non-trivial statistics and affine parameters (a freshly constructed
BatchNorm is the identity in eval mode, which would hide any mistake in pruning it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ZOO", "ZooEntry", "build", "example_input"]


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: its name, a seeded factory (seed 0), its batch-1 input shape, its classes."""

    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int


# --------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Fully connected ReLU net: flatten, Linear-ReLU twice, Linear.

    Input (N, 1, 8, 8) -> 10 logits.
    Modules: Flatten x1, Linear x3, ReLU x2.
    Ops: none.
    Pruning: the two hidden layers (32 and 16 units) are independent groups; pruning a unit
    removes a row of its Linear and the matching column of the next one.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64, 32)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(32, 16)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.fc1(self.flatten(x)))
        x = self.relu2(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """LeNet-5 style: conv-ReLU-maxpool twice, flatten, three Linear layers.

    Input (N, 1, 28, 28) -> 10 logits.
    Modules: Conv2d x2, ReLU x4, MaxPool2d x2, Flatten x1, Linear x3.
    Ops: none.
    Pruning: conv2 (16 channels) feeds the first Linear through a flatten, so one channel is
    25 consecutive input features (5x5 positions) of fc1.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)  # 6x28x28
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)  # 6x14x14
        self.conv2 = nn.Conv2d(6, 16, 5)  # 16x10x10
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)  # 16x5x5
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * 5 * 5, 32)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(32, 16)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.flatten(x)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)


class VggBN(nn.Module):
    """VGG style: (conv-BN-ReLU x2, maxpool) twice, flatten, Linear-ReLU-Dropout-Linear.

    Input (N, 3, 16, 16) -> 10 logits.
    Modules: Conv2d x4, BatchNorm2d x4, ReLU x5, MaxPool2d x2, Flatten x1, Linear x2, Dropout x1.
    Ops: none.
    Pruning: each BatchNorm belongs to the group of the conv before it (its running stats,
    weight and bias are pruned with the conv's output channels); the last conv (16 channels)
    reaches fc1 through flatten as 16 blocks of 4x4 features.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)  # 8x8x8
        self.conv3 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(16)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn4 = nn.BatchNorm2d(16)
        self.relu4 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)  # 16x4x4
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.relu5 = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.pool1(self.relu2(self.bn2(self.conv2(x))))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.pool2(self.relu4(self.bn4(self.conv4(x))))
        x = self.flatten(x)
        x = self.drop(self.relu5(self.fc1(x)))
        return self.fc2(x)


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN, plus the shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class ResNet(nn.Module):
    """ResNet style: stem conv-BN-ReLU, identity block, downsampling block, identity block, head.

    Input (N, 3, 16, 16) -> 10 logits.
    Modules: Conv2d x8, BatchNorm2d x8, ReLU x7, AdaptiveAvgPool2d x1, Flatten x1, Linear x1.
    Ops: operator.add.
    Pruning: the residual adds tie channels across layers: {stem conv, stem BN, layer1.conv2,
    layer1.bn2} are one group (8), {layer2.conv2, layer2.bn2, layer2.downsample.0/.1,
    layer3.conv2, layer3.bn2} another (16, consumed by fc); each block's conv1 (8, 16, 16) is a
    group of its own.  The downsample shortcut is a 1x1 stride-2 conv + BN.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, stride=2)
        self.layer3 = BasicBlock(16, 16)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


class Inception(nn.Module):
    """Inception style: stem, four concatenated branches, a 1x1 mixer, a self-concatenation, head.

    Input (N, 3, 16, 16) -> 10 logits.
    Modules: Conv2d x10, BatchNorm2d x1, ReLU x10, MaxPool2d x1, AdaptiveAvgPool2d x1, Flatten x1,
        Linear x1.
    Ops: torch.cat.
    Pruning: the branches (b1 8, b2 8, b3 8, b4 4 channels) are concatenated into 28 channels,
    so the mixer's input columns are the branch groups at offsets 0, 8, 16 and 24; the maxpool
    branch passes the stem's channels through to b4's 1x1 conv.  ``torch.cat([y, y], dim=1)``
    feeds ``dup`` with the mixer's 16 channels twice: a pruned mixer channel c removes input
    columns c and c + 16 of ``dup``.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(8)
        self.stem_relu = nn.ReLU()
        # branch 1: 1x1
        self.b1 = nn.Conv2d(8, 8, 1)
        self.b1_relu = nn.ReLU()
        # branch 2: 1x1 -> 3x3
        self.b2_reduce = nn.Conv2d(8, 4, 1)
        self.b2_relu1 = nn.ReLU()
        self.b2 = nn.Conv2d(4, 8, 3, padding=1)
        self.b2_relu2 = nn.ReLU()
        # branch 3: 1x1 -> 3x3 -> 3x3 (a factorised 5x5)
        self.b3_reduce = nn.Conv2d(8, 4, 1)
        self.b3_relu1 = nn.ReLU()
        self.b3_a = nn.Conv2d(4, 4, 3, padding=1)
        self.b3_relu2 = nn.ReLU()
        self.b3_b = nn.Conv2d(4, 8, 3, padding=1)
        self.b3_relu3 = nn.ReLU()
        # branch 4: maxpool 3x3 s1 p1 -> 1x1
        self.b4_pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.b4 = nn.Conv2d(8, 4, 1)
        self.b4_relu = nn.ReLU()
        # after the concatenation
        self.mix = nn.Conv2d(28, 16, 1)
        self.mix_relu = nn.ReLU()
        self.dup = nn.Conv2d(32, 16, 3, padding=1)
        self.dup_relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_relu(self.stem_bn(self.stem(x)))
        y1 = self.b1_relu(self.b1(x))
        y2 = self.b2_relu2(self.b2(self.b2_relu1(self.b2_reduce(x))))
        y3 = self.b3_relu1(self.b3_reduce(x))
        y3 = self.b3_relu3(self.b3_b(self.b3_relu2(self.b3_a(y3))))
        y4 = self.b4_relu(self.b4(self.b4_pool(x)))
        y = torch.cat([y1, y2, y3, y4], dim=1)
        y = self.mix_relu(self.mix(y))
        y = self.dup_relu(self.dup(torch.cat([y, y], dim=1)))
        return self.fc(self.flatten(self.pool(y)))


class MobileNet(nn.Module):
    """MobileNet style: two depthwise-separable blocks, a grouped conv, a 1-channel attention gate.

    Input (N, 3, 16, 16) -> 10 logits.
    Modules: Conv2d x7, BatchNorm2d x6, ReLU x4, ReLU6 x2, AdaptiveAvgPool2d x1, Flatten x1,
        Linear x1.
    Ops: torch.sigmoid, operator.mul.
    Pruning: ``dw1`` is depthwise (groups = in = out = 8), so its channels belong to the stem's
    group; ``dw2`` has channel multiplier 2 (groups 16, out 32): input channel c owns output
    channels 2c and 2c + 1, and pruning c removes both (pw1's group then spans pw1, bn, dw2 as
    blocks of 2, and dw2's BN).  ``gconv`` has groups=2 (not depthwise): its input and output
    channels must be pruned in equal numbers from each half, with the weight sliced per group.
    ``attn`` is a plain conv with ONE output channel (groups=1, so ``groups == out_channels``
    does not make it depthwise); its (N, 1, H, W) sigmoid map multiplies the 16 features by
    broadcasting, which ties nothing to the attention channel.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.stem_relu = nn.ReLU()
        # block 1: depthwise 8 -> 8, pointwise 8 -> 16
        self.dw1 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.dw1_bn = nn.BatchNorm2d(8)
        self.dw1_relu = nn.ReLU6()
        self.pw1 = nn.Conv2d(8, 16, 1, bias=False)
        self.pw1_bn = nn.BatchNorm2d(16)
        self.pw1_relu = nn.ReLU()
        # block 2: depthwise with channel multiplier 2 (16 -> 32, stride 2), pointwise 32 -> 16
        self.dw2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=16, bias=False)
        self.dw2_bn = nn.BatchNorm2d(32)
        self.dw2_relu = nn.ReLU6()
        self.pw2 = nn.Conv2d(32, 16, 1, bias=False)
        self.pw2_bn = nn.BatchNorm2d(16)
        self.pw2_relu = nn.ReLU()
        # grouped (not depthwise) conv
        self.gconv = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.gconv_bn = nn.BatchNorm2d(16)
        self.gconv_relu = nn.ReLU()
        # spatial attention: one output channel, groups=1
        self.attn = nn.Conv2d(16, 1, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_relu(self.stem_bn(self.stem(x)))
        x = self.dw1_relu(self.dw1_bn(self.dw1(x)))
        x = self.pw1_relu(self.pw1_bn(self.pw1(x)))
        x = self.dw2_relu(self.dw2_bn(self.dw2(x)))
        x = self.pw2_relu(self.pw2_bn(self.pw2(x)))
        x = self.gconv_relu(self.gconv_bn(self.gconv(x)))
        x = x * torch.sigmoid(self.attn(x))
        return self.fc(self.flatten(self.pool(x)))


class SqueezeExcite(nn.Module):
    """Squeeze-excitation: conv-BN-ReLU, an SE gate with a hard-coded view, conv, pool, Linear.

    Input (N, 3, 16, 16) -> 10 logits.
    Modules: Conv2d x2, BatchNorm2d x1, ReLU x3, AdaptiveAvgPool2d x2, Flatten x2, Linear x3,
        Sigmoid x1.
    Ops: .size, .view, operator.mul.
    Pruning: ``x * s`` ties the conv's 16 channels to the 16 outputs of ``se_fc2`` (one group:
    conv1, bn1, se_fc1's input columns, se_fc2's rows); ``s.view(x.size(0), 16, 1, 1)`` has the
    channel count HARD-CODED, so pruning the group must rewrite the view's argument.  The SE
    bottleneck (``se_fc1``, 4 units) is a group of its own.
    """

    CHANNELS = 16

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        c = self.CHANNELS
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.squeeze = nn.AdaptiveAvgPool2d(1)
        self.se_flatten = nn.Flatten()
        self.se_fc1 = nn.Linear(c, c // 4)
        self.se_relu = nn.ReLU()
        self.se_fc2 = nn.Linear(c // 4, c)
        self.se_gate = nn.Sigmoid()
        self.conv2 = nn.Conv2d(c, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        s = self.se_flatten(self.squeeze(x))
        s = self.se_gate(self.se_fc2(self.se_relu(self.se_fc1(s))))
        s = s.view(x.size(0), 16, 1, 1)  # hard-coded C on purpose
        x = x * s
        x = self.relu2(self.conv2(x))
        return self.fc(self.flatten(self.pool(x)))


class FlattenView(nn.Module):
    """Conv-ReLU-conv-ReLU, then two hard-coded flattens (view and reshape) into two Linears.

    Input (N, 1, 28, 28) -> 10 logits.
    Modules: Conv2d x2, ReLU x4, Linear x3.
    Ops: .view, .size, .reshape, operator.add.
    Pruning: conv2's 16 channels (16x7x7) are flattened twice with HARD-CODED sizes,
    ``x.view(-1, 16 * 7 * 7)`` and ``x.reshape(x.size(0), 784)``: pruning conv2 must remove
    49 consecutive input columns of ``fc_a`` and ``fc_b`` per channel and rewrite both 784s.
    ``fc_a`` and ``fc_b`` are added, so their 16 outputs form one group.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, stride=2, padding=1)  # 8x14x14
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)  # 16x7x7
        self.relu2 = nn.ReLU()
        self.fc_a = nn.Linear(16 * 7 * 7, 16)
        self.relu_a = nn.ReLU()
        self.fc_b = nn.Linear(784, 16)
        self.relu_b = nn.ReLU()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        a = self.relu_a(self.fc_a(x.view(-1, 16 * 7 * 7)))
        b = self.relu_b(self.fc_b(x.reshape(x.size(0), 784)))
        return self.fc(a + b)


class Functional(nn.Module):
    """Functional ops only in forward; modules only for conv, BatchNorm and Linear.

    Input (N, 3, 16, 16) -> 10 logits.
    Modules: Conv2d x5, BatchNorm2d x1, Linear x3.
    Ops: F.relu, F.max_pool2d, F.leaky_relu, F.gelu, operator.sub, operator.add, torch.relu,
        F.silu, torch.tanh, torch.add, F.hardswish, F.avg_pool2d, .mean, F.adaptive_avg_pool2d,
        torch.flatten, torch.sigmoid.
    Pruning: every activation and pooling is a ``call_function`` / ``call_method`` node, not a
    module.  ``conv_a(x) - conv_b(x) + x`` ties conv1, bn1, conv_a and conv_b into one group
    (8); ``torch.add(z, tanh(conv3(z)))`` ties conv2 and conv3 (16); ``fc1(mean) +
    sigmoid(fc2(pool))`` ties fc1 and fc2 (16).  ``x.mean((2, 3))`` is a global pooling that
    keeps the channel axis as the feature axis.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 8, 1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 1)
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 2)  # 8x8x8
        a = F.leaky_relu(self.conv_a(x), 0.1)
        b = F.gelu(self.conv_b(x))
        y = torch.relu(a - b + x)
        z = F.silu(self.conv2(y))
        z = F.hardswish(torch.add(z, torch.tanh(self.conv3(z))))
        z = F.avg_pool2d(z, 2)  # 16x4x4
        g = z.mean((2, 3))
        h = torch.flatten(F.adaptive_avg_pool2d(z, 1), 1)
        f = F.relu(self.fc1(g)) + torch.sigmoid(self.fc2(h))
        return self.fc(f)


class Chunk(nn.Module):
    """Chunk and split: a conv's output is cut into pieces that go through convs, an add and a cat.

    Input (N, 3, 16, 16) -> 10 logits.
    Modules: Conv2d x6, ReLU x6, AdaptiveAvgPool2d x1, Flatten x1, Linear x1.
    Ops: .chunk, operator.getitem, operator.add, torch.functional.split, torch.cat.
    Pruning: ``x.chunk(2, dim=1)`` cuts conv0's 8 channels into two halves that feed different
    convs, so pruning conv0 must keep the halves' boundary (equal counts from each half, or the
    chunk replaced by explicit sizes).  ``conv_a`` and ``conv_b`` are added (one group of 12).
    ``torch.split(y, [4, 8], dim=1)`` has EXPLICIT sizes that must be rewritten: the first 4
    channels go through ``conv_p``, and ``cat([conv_p(p), q])`` puts the last 8 channels of the
    add group back at offset 8 of ``conv_out``'s input.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu0 = nn.ReLU()
        self.conv_a = nn.Conv2d(4, 12, 1)
        self.relu_a = nn.ReLU()
        self.conv_b = nn.Conv2d(4, 12, 3, padding=1)
        self.relu_b = nn.ReLU()
        self.conv_p = nn.Conv2d(4, 8, 3, padding=1)
        self.relu_p = nn.ReLU()
        self.conv_out = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.relu_out = nn.ReLU()
        self.conv_head = nn.Conv2d(16, 8, 1)
        self.relu_head = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu0(self.conv0(x))
        a, b = x.chunk(2, dim=1)
        y = self.relu_a(self.conv_a(a)) + self.relu_b(self.conv_b(b))
        p, q = torch.split(y, [4, 8], dim=1)
        z = torch.cat([self.relu_p(self.conv_p(p)), q], dim=1)
        z = self.relu_out(self.conv_out(z))
        z = self.relu_head(self.conv_head(z))
        return self.fc(self.flatten(self.pool(z)))


class Norms(nn.Module):
    """GroupNorm after convs (4 groups, and as many groups as channels), LayerNorm in an MLP.

    Input (N, 3, 16, 16) -> 10 logits.
    Modules: Conv2d x2, GroupNorm x2, ReLU x2, AdaptiveAvgPool2d x1, Flatten x1, Linear x2,
        LayerNorm x1, GELU x1.
    Ops: none.
    Pruning: ``gn1`` = GroupNorm(4, 16) normalises blocks of 4 channels together: conv1's channels
    must go in equal numbers from each block (and num_groups stays 4), and removing a channel
    changes the statistics of the others in its block.  ``gn2`` = GroupNorm(8, 8) has
    num_groups == C: per-channel, freely prunable, but num_groups must shrink with C.
    ``ln`` = LayerNorm(16) over fc1's features: its weight, bias and normalized_shape are pruned
    with fc1, and every removed unit changes the mean and variance of the kept ones.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gn1 = nn.GroupNorm(4, 16)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 8, 3, stride=2, padding=1)
        self.gn2 = nn.GroupNorm(8, 8)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.gelu = nn.GELU()
        self.fc2 = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.gn1(self.conv1(x)))
        x = self.relu2(self.gn2(self.conv2(x)))
        x = self.flatten(self.pool(x))
        return self.fc2(self.gelu(self.ln(self.fc1(x))))


class Conv1dNet(nn.Module):
    """1-D convolutions over (N, C, L): conv-BN-ReLU-maxpool, conv-BN-ReLU, global pool, Linear.

    Input (N, 4, 32) -> 5 logits.
    Modules: Conv1d x2, BatchNorm1d x2, ReLU x2, MaxPool1d x1, AdaptiveAvgPool1d x1, Flatten x1,
        Linear x1.
    Ops: none.
    Pruning: as for 2-D convs, with the channel axis at dim 1 of a 3-D tensor; the 4 input
    channels are the data's and are never pruned.
    """

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 8, 5, padding=2)
        self.bn1 = nn.BatchNorm1d(8)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool1d(2)  # 8x16
        self.conv2 = nn.Conv1d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm1d(16)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(self.flatten(self.pool(x)))


class ResidualChain(nn.Module):
    """A chain of residual updates on one 8-channel stream: three adds and a sub, then a head.

    Input (N, 3, 16, 16) -> 10 logits.
    Modules: Conv2d x8, BatchNorm2d x4, ReLU x5, AdaptiveAvgPool2d x1, Flatten x1, Linear x1.
    Ops: operator.add, operator.sub.
    Pruning: ``x + f1(x)``, ``x + f2(x)``, ``x + f3(x)`` and ``x - f4(x)`` all share ONE group:
    the output channels of the stem conv and BN, of the last conv and BN of f1..f3 and of f4,
    plus the input columns of each f's first conv, of f4 and of the classifier.  The 4-channel
    bottleneck inside each f is a group of its own.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(8)
        self.stem_relu = nn.ReLU()
        self.f1 = self._residual(8, 4)
        self.f2 = self._residual(8, 4)
        self.f3 = self._residual(8, 4)
        self.f4 = nn.Conv2d(8, 8, 1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8, num_classes)

    @staticmethod
    def _residual(c: int, hidden: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(c, hidden, 1),
            nn.ReLU(),
            nn.Conv2d(hidden, c, 3, padding=1),
            nn.BatchNorm2d(c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_relu(self.stem_bn(self.stem(x)))
        x = x + self.f1(x)
        x = x + self.f2(x)
        x = x + self.f3(x)
        x = x - self.f4(x)
        return self.fc(self.flatten(self.pool(self.relu(x))))


# --------------------------------------------------------------------------------------------
# The zoo
# --------------------------------------------------------------------------------------------

# name -> (architecture, input shape with batch 1, number of classes)
# ----------------------------------------------------------------------------------------------
# Models for single tests, not in the zoo
# ----------------------------------------------------------------------------------------------


class Asserts(nn.Module):
    """``torch._assert`` on the input's rank, on a channel width and on the batch size.

    Input (N, 6) -> 3 logits.  Only the width check (``h.shape[1] == 8``, the second assert, so
    its node is ``_assert_1``) must keep units: fc1's; fc2 stays prunable.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.dim() == 2, "expects (N, 6)")
        h = torch.relu(self.fc1(x))
        torch._assert(h.shape[1] == 8, "fc1 gives 8 features")
        g = torch.relu(self.fc2(h))
        torch._assert(g.size(0) == x.size(0), "one row per sample")
        return self.fc(g)


_ARCHITECTURES: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...], int]] = {
    "mlp": (MLP, (1, 1, 8, 8), 10),
    "lenet5": (LeNet5, (1, 1, 28, 28), 10),
    "vgg_bn": (VggBN, (1, 3, 16, 16), 10),
    "resnet": (ResNet, (1, 3, 16, 16), 10),
    "inception": (Inception, (1, 3, 16, 16), 10),
    "mobilenet": (MobileNet, (1, 3, 16, 16), 10),
    "se": (SqueezeExcite, (1, 3, 16, 16), 10),
    "flatten_view": (FlattenView, (1, 1, 28, 28), 10),
    "functional": (Functional, (1, 3, 16, 16), 10),
    "chunk": (Chunk, (1, 3, 16, 16), 10),
    "norms": (Norms, (1, 3, 16, 16), 10),
    "conv1d": (Conv1dNet, (1, 4, 32), 5),
    "residual_chain": (ResidualChain, (1, 3, 16, 16), 10),
}

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


def _lookup(name: str) -> tuple[Callable[..., nn.Module], tuple[int, ...], int]:
    try:
        return _ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(_ARCHITECTURES)
        raise KeyError(f"unknown zoo model {name!r}; known models: {known}") from None


def _randomize_norms(model: nn.Module) -> None:
    """Give every norm layer non-trivial affine parameters and (for BatchNorm) running stats.

    Draws from torch's global generator, which the caller has seeded.
    """
    with torch.no_grad():
        for mod in model.modules():
            if not isinstance(mod, _NORMS):
                continue
            if getattr(mod, "weight", None) is not None:
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)


def build(name: str, *, seed: int = 0) -> nn.Module:
    """Zoo model ``name`` with weights drawn from ``seed``, in eval mode.

    Deterministic (same name and seed, same state dict) and leaves torch's global random state
    as it found it.  Norm layers get random running statistics and affine parameters.
    """
    arch, _, num_classes = _lookup(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = arch(num_classes=num_classes)
        _randomize_norms(model)
    return model.eval()


def example_input(name: str, batch: int = 4, *, seed: int = 0) -> torch.Tensor:
    """A standard-normal input batch for zoo model ``name``, drawn from its own generator."""
    _, shape, _ = _lookup(name)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *shape[1:]), generator=gen)


ZOO: dict[str, ZooEntry] = {
    name: ZooEntry(name, functools.partial(build, name), shape, classes)
    for name, (_, shape, classes) in _ARCHITECTURES.items()
}
