"""The example architectures shipped with oamipc.

These are the networks behind the trained files in ``examples/`` and the paper reproductions:
small enough to train on a CPU in seconds to minutes, and written so that ``torch.fx.symbolic_trace``
sees every layer as its own ``call_module`` node (one ``nn.ReLU`` instance per use, no shared
modules, no data-dependent control flow).  That keeps the unit-group analysis and the pruned
layer names readable (``body.0``, ``features.conv2``, ...).

The small networks do not seed anything: call ``torch.manual_seed`` first when their initial
weights must be reproducible (``examples/train_examples.py`` does).  The two standard ImageNet
architectures, :class:`ResNet18` and :class:`MobileNetV2`, are there to measure pruning on
networks of a realistic shape and size (``benchmarks/latency.py``) without a trained file; they
draw their weights from a ``seed`` argument instead, so that a benchmark gets the same network
every time without a download.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "BasicBlock", "DigitsCNN", "DigitsMLP", "DigitsSeq", "InvertedResidual", "LeNet5", "MobileNetV2", "PaperMLP",
    "ResNet18", "SelfAttention", "SmallCNN", "SmallResNet", "SmallVGG", "TransformerBlock", "ViT",
]


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


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    """3x3 convolution (no bias: the batch norm has one), batch norm, ReLU -- a fresh module each."""
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


def _widths(widths: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(w) for w in widths)
    if not out or any(w < 1 for w in out):
        raise ValueError(f"stage widths must be a non-empty sequence of positive integers, got {tuple(widths)}")
    return out


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
    """LeNet-5 with ReLU and max (or average) pooling for 28x28 inputs: (N, C, 28, 28) -> ``num_classes``.

    ``conv(C->6, 5x5, pad 2) ReLU pool2, conv(6->16, 5x5) ReLU pool2, flatten 400, fc 120 ReLU,
    fc 84 ReLU, fc num_classes`` -- the modern variant of LeCun et al. (1998) that the OAMIP paper
    also prunes (the padding makes 28x28 inputs behave like the original 32x32 ones).
    ``pool="avg"`` gives 2x2 average pooling, closer to the original's subsampling layers; for
    the pruner an average pool is affine (no binaries in the MILP), a max pool is not.
    """

    POOLS: tuple[str, ...] = ("max", "avg")

    def __init__(self, in_channels: int = 1, num_classes: int = 10, pool: str = "max") -> None:
        super().__init__()
        if pool not in self.POOLS:
            raise ValueError(f"pool must be one of {', '.join(self.POOLS)}, got {pool!r}")
        pool_cls = nn.MaxPool2d if pool == "max" else nn.AvgPool2d
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = pool_cls(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = pool_cls(2)
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


class SmallCNN(nn.Module):
    """A plain CNN: per stage a 3x3 conv (padding 1), optional batch norm, ReLU, 2x2 max pool; then an MLP head.

    ``(N, in_channels, image_size, image_size) -> num_classes``.  Stage ``i`` has ``widths[i]``
    channels and halves the resolution (floor), so the head sees ``widths[-1] * (image_size //
    2**len(widths))**2`` features: flatten, linear to ``hidden``, ReLU, linear to
    ``num_classes``.  ``batch_norm=False`` gives the convolutions biases and no batch norm, so
    the same shape can be trained with and without it (the trained-network family of
    ``benchmarks/family.py``).  Layer names: ``features.<i>`` (conv, [bn,] relu, pool per stage)
    and ``head.<i>``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (16, 32),
                 image_size: int = 8, hidden: int = 64, batch_norm: bool = True) -> None:
        super().__init__()
        stages = _widths(widths)
        side = int(image_size) // 2 ** len(stages)
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for {len(stages)} pooling stages "
                             f"(needs at least {2 ** len(stages)})")
        layers: list[nn.Module] = []
        c_in = int(in_channels)
        for c in stages:
            layers.append(nn.Conv2d(c_in, c, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c))
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(stages[-1] * side * side, int(hidden)), nn.ReLU(),
                                  nn.Linear(int(hidden), num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SmallVGG(nn.Module):
    """A VGG-style CNN: per stage two conv-BN-ReLU blocks and a 2x2 max pool, then an MLP head.

    ``(N, in_channels, image_size, image_size) -> num_classes``.  Stage ``i`` has ``widths[i]``
    channels (3x3 convolutions, padding 1, no bias); each stage halves the resolution (floor), so
    the head sees ``widths[-1] * (image_size // 2**len(widths))**2`` features: flatten, linear to
    ``hidden``, ReLU, linear to ``num_classes``.  The defaults fit 28x28 greyscale images (7.4M
    MACs); ``SmallVGG(in_channels=3, image_size=32)`` is the 32x32 net of
    ``benchmarks/mip_reach.py``.  Why this shape: it gives the pruner long conv->BN->ReLU chains
    and max pools (whose MILP encoding needs binaries) with few parameters.
    Layer names: ``features.<i>`` (conv, bn, relu, ..., pool per stage) and ``head.<i>``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64),
                 image_size: int = 28, hidden: int = 128) -> None:
        super().__init__()
        stages = _widths(widths)
        side = int(image_size) // 2 ** len(stages)
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for {len(stages)} pooling stages "
                             f"(needs at least {2 ** len(stages)})")
        layers: list[nn.Module] = []
        c_in = int(in_channels)
        for c in stages:
            layers += _conv_bn_relu(c_in, c) + _conv_bn_relu(c, c) + [nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(stages[-1] * side * side, int(hidden)), nn.ReLU(),
                                  nn.Linear(int(hidden), num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(body(x) + shortcut(x))``.

    ``body`` is conv-BN-ReLU (stride ``stride``) then conv-BN; the shortcut is the identity when
    shape is kept (stride 1, ``c_in == c_out``), else a 1x1 strided convolution with batch norm
    (a projection).  The addition ties the channels of ``body``'s last conv to the shortcut's, so
    the pruner must remove the same channels from both (one unit group across the block).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn_relu(c_in, c_out, stride),
                                  nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.short: nn.Module = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.short(x))


class SmallResNet(nn.Module):
    """A ResNet-style CNN: conv-BN-ReLU stem, one :class:`BasicBlock` per stage, global average pool, linear.

    ``(N, in_channels, H, W) -> num_classes`` for any ``H, W`` (the global pool makes the head
    independent of the resolution).  The stem has ``widths[0]`` channels; stage ``i`` is a basic
    block to ``widths[i]`` channels, with stride 1 for the first stage and 2 (and a projection
    shortcut) for the others.  The defaults (16, 32, 64) at 28x28 cost 9.3M MACs; with
    ``in_channels=3`` it is the 32x32 net of ``benchmarks/mip_reach.py``.
    Layer names: ``stem.<i>``, ``blocks.<stage>.body.<i>`` / ``.short.<i>``, ``head.<i>``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        stages = _widths(widths)
        self.stem = nn.Sequential(*_conv_bn_relu(int(in_channels), stages[0]))
        blocks = [BasicBlock(c_in, c_out, 1 if i == 0 else 2)
                  for i, (c_in, c_out) in enumerate(zip((stages[0], *stages[:-1]), stages))]
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(stages[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


# ------------------------------------------------------------------------- standard architectures


def _seeded_init(model: nn.Module, seed: int) -> None:
    """Draw every weight and batch-norm statistic of ``model`` from its own generator seeded with ``seed``.

    Convolutions get He-normal weights (std ``sqrt(2 / fan_in)``, fan-in per group, so depthwise
    layers are scaled like dense ones), linear layers normal weights with std ``1 / sqrt(fan_in)``
    and small biases.  Batch norms get scales in [0.5, 1.5], shifts, running means and running
    variances in [0.5, 2]: a freshly constructed batch norm is the identity in eval mode, which
    would make every channel look alike to a criterion that reads it and would hide a pruning
    mistake in its statistics.  The draws go in module order from one ``torch.Generator``, so
    torch's global random state is neither used nor changed here.
    """
    gen = torch.Generator().manual_seed(int(seed))

    def fill(t: torch.Tensor, kind: str, a: float, b: float) -> None:
        data = (torch.randn(t.shape, generator=gen) * b + a if kind == "normal"
                else torch.rand(t.shape, generator=gen) * (b - a) + a)
        t.copy_(data)

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Conv2d):
                fan_in = mod.weight[0].numel()
                fill(mod.weight, "normal", 0.0, (2.0 / fan_in) ** 0.5)
                if mod.bias is not None:
                    fill(mod.bias, "normal", 0.0, 0.05)
            elif isinstance(mod, nn.Linear):
                fill(mod.weight, "normal", 0.0, mod.in_features ** -0.5)
                if mod.bias is not None:
                    fill(mod.bias, "normal", 0.0, 0.05)
            elif isinstance(mod, nn.BatchNorm2d):
                fill(mod.weight, "uniform", 0.5, 1.5)
                fill(mod.bias, "normal", 0.0, 0.2)
                if mod.running_mean is not None and mod.running_var is not None:
                    fill(mod.running_mean, "normal", 0.0, 0.2)
                    fill(mod.running_var, "uniform", 0.5, 2.0)


def _built_quietly(build: Callable[[], None]) -> None:
    """Run ``build`` (which creates layers, whose default init draws from torch's global RNG) without
    changing the global random state: the layers are re-drawn by :func:`_seeded_init` anyway."""
    with torch.random.fork_rng(devices=[]):
        build()


def _stage_depths(blocks: Sequence[int], stages: Sequence[int]) -> tuple[int, ...]:
    """The blocks per stage of a ResNet, one positive count per stage width."""
    depths = tuple(int(b) for b in blocks)
    if len(depths) != len(stages) or any(b < 1 for b in depths):
        raise ValueError(f"blocks must give a positive block count per stage ({len(stages)} stages), "
                         f"got {tuple(blocks)}")
    return depths


def _resnet_stem(in_channels: int, width: int) -> nn.Sequential:
    """The ImageNet ResNet stem: 7x7 stride-2 conv, batch norm, ReLU, 3x3 stride-2 max pool."""
    return nn.Sequential(nn.Conv2d(int(in_channels), width, 7, stride=2, padding=3, bias=False),
                         nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1))


class _ResNet(nn.Module):
    """What ResNet-18 and ResNet-50 share: ``stem``, ``layer1..layerN`` (``stages`` of them), then
    global pool, flatten and ``fc``; subclasses build those modules."""

    stages: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for s in range(self.stages):
            x = getattr(self, f"layer{s + 1}")(x)
        return self.fc(self.flatten(self.pool(x)))


class ResNet18(_ResNet):
    """ResNet-18 (He et al., "Deep Residual Learning for Image Recognition", 2016), written here.

    ``(N, in_channels, H, W) -> num_classes``, for 224x224 ImageNet images by design and any
    size from 32x32 up (the adaptive pool makes the head independent of the resolution).
    Stem: 7x7 convolution stride 2 to ``widths[0]`` channels, batch norm, ReLU, 3x3 max pool
    stride 2.  Then four stages of ``blocks[i]`` :class:`BasicBlock` at ``widths[i]`` channels,
    the first block of stages 2-4 with stride 2 and a 1x1 projection shortcut; global average
    pool, flatten, linear.  The defaults, ``blocks=(2, 2, 2, 2)`` and ``widths=(64, 128, 256,
    512)``, are the standard ResNet-18: 11.7M parameters and 1.82G MACs at 224x224 with 1000
    classes.  Why it is here: the residual adds tie each stage's block outputs into one unit
    group, and its widths are all multiples of 16, so it shows what pruning to widths that break
    the CPU kernels' channel block costs on a network of real size (``benchmarks/latency.py``).

    Weights and batch-norm statistics are drawn from ``seed`` (see :func:`_seeded_init`); torch's
    global random state is left as it was.  Layer names: ``stem.<i>``, ``layer<s>.<b>.body.<i>``
    / ``.short.<i>``, ``fc``.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, blocks: Sequence[int] = (2, 2, 2, 2),
                 widths: Sequence[int] = (64, 128, 256, 512), seed: int = 0) -> None:
        super().__init__()
        stages = _widths(widths)
        depths = _stage_depths(blocks, stages)

        def build() -> None:
            self.stem = _resnet_stem(in_channels, stages[0])
            c_in = stages[0]
            for s, (depth, c_out) in enumerate(zip(depths, stages)):
                stride = 1 if s == 0 else 2
                layer = [BasicBlock(c_in, c_out, stride)] + [BasicBlock(c_out, c_out) for _ in range(depth - 1)]
                setattr(self, f"layer{s + 1}", nn.Sequential(*layer))
                c_in = c_out
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.flatten = nn.Flatten()
            self.fc = nn.Linear(stages[-1], int(num_classes))

        _built_quietly(build)
        self.stages = len(stages)
        _seeded_init(self, seed)


class Bottleneck(nn.Module):
    """ResNet bottleneck block: ``relu(body(x) + shortcut(x))`` with a 4x wider output.

    ``body``: 1x1 conv-BN-ReLU to ``width``, 3x3 conv-BN-ReLU with ``stride`` (the torchvision
    "v1.5" placement), 1x1 conv-BN to ``4 * width``; the shortcut is the identity when the
    shape is kept, else a strided 1x1 projection with batch norm.  As in :class:`BasicBlock`, the
    addition ties the block's output channels to the shortcut's (one unit group across a stage).
    """

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.body = nn.Sequential(nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  *_conv_bn_relu(width, width, stride),
                                  nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.short: nn.Module = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.short(x))


class ResNet50(_ResNet):
    """ResNet-50 (He et al., 2016), written here: :class:`ResNet18`'s stem and head around four
    stages of :class:`Bottleneck` blocks, ``blocks=(3, 4, 6, 3)`` at widths (64, 128, 256, 512)
    (outputs four times wider).  The defaults are the standard network: 25.6M parameters and
    4.09G MACs at 224x224 with 1000 classes.  Why it is here: about five times ResNet-18's prunable
    channels, the size the MIP planner's scale benchmark (``benchmarks/mip_scale.py``) reaches for.
    Weights and batch-norm statistics are drawn from ``seed`` (:func:`_seeded_init`).  Layer
    names: ``stem.<i>``, ``layer<s>.<b>.body.<i>`` / ``.short.<i>``, ``fc``.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, blocks: Sequence[int] = (3, 4, 6, 3),
                 widths: Sequence[int] = (64, 128, 256, 512), seed: int = 0) -> None:
        super().__init__()
        stages = _widths(widths)
        depths = _stage_depths(blocks, stages)

        def build() -> None:
            self.stem = _resnet_stem(in_channels, 64)
            c_in = 64
            for s, (depth, width) in enumerate(zip(depths, stages)):
                stride = 1 if s == 0 else 2
                layer = [Bottleneck(c_in, width, stride)]
                c_in = width * Bottleneck.expansion
                layer += [Bottleneck(c_in, width) for _ in range(depth - 1)]
                setattr(self, f"layer{s + 1}", nn.Sequential(*layer))
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.flatten = nn.Flatten()
            self.fc = nn.Linear(c_in, int(num_classes))

        _built_quietly(build)
        self.stages = len(stages)
        _seeded_init(self, seed)


def _conv_bn_relu6(c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Convolution (no bias), batch norm, ReLU6 -- MobileNetV2's building block."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU6())


def _divisible(width: float, divisor: int = 8) -> int:
    """``width`` rounded to the nearest multiple of ``divisor``, never below 90% of it (MobileNetV2's rule)."""
    out = max(divisor, int(width + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * width else out


class InvertedResidual(nn.Module):
    """MobileNetV2's inverted residual block: expand, depthwise, project (a linear bottleneck).

    ``expand``: 1x1 conv-BN-ReLU6 from ``c_in`` to ``c_in * expansion`` channels (absent when
    ``expansion`` is 1); ``depthwise``: 3x3 depthwise conv-BN-ReLU6 with ``stride``; ``project``:
    1x1 conv-BN back down to ``c_out``, with no activation (the paper's linear bottleneck).  The
    input is added back when the shape is kept (stride 1, ``c_in == c_out``).  For the pruner:
    the depthwise conv ties its channels to the expansion's outputs (one group through the
    block), and the residual add ties ``project``'s outputs to the block's input, so the
    bottleneck widths of a whole stage form one group.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = int(round(c_in * expansion))
        self.expand: nn.Module = nn.Identity() if expansion == 1 else _conv_bn_relu6(c_in, hidden)
        self.depthwise = _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden)
        self.project = nn.Sequential(nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", 2018), written here.

    ``(N, in_channels, H, W) -> num_classes``, for 224x224 images by design and any size from
    32x32 up.  Stem: 3x3 conv-BN-ReLU6 stride 2 to 32 channels; then the paper's table of
    :class:`InvertedResidual` stages, rows ``(t, c, n, s)`` = expansion, width, blocks, stride
    of the first block (:attr:`SETTINGS`: the first stage has expansion 1, the other six
    expansion 6); a 1x1 conv-BN-ReLU6 to 1280 channels; global average pool, flatten, dropout
    (``dropout``, 0.2) and a linear classifier.  ``width_mult`` scales every width except the
    last 1280 (for multipliers <= 1), rounded to multiples of 8 as in the paper's code; at 1.0
    (the default) it is the standard network: 3.5M parameters and 0.30G MACs at 224x224 with
    1000 classes.  Why it is here: depthwise convolutions, linear bottlenecks and residual adds
    across a stage make its unit groups unlike a plain CNN's, and the depthwise layers are where
    widths that break the CPU kernels' channel block cost most (``benchmarks/latency.py``).

    Weights and batch-norm statistics are drawn from ``seed`` (see :func:`_seeded_init`); torch's
    global random state is left as it was.  Layer names: ``stem.<i>``,
    ``blocks.<k>.expand.<i>`` / ``.depthwise.<i>`` / ``.project.<i>``, ``head.<i>``,
    ``classifier.<i>``.
    """

    SETTINGS: tuple[tuple[int, int, int, int], ...] = (
        (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0,
                 dropout: float = 0.2, seed: int = 0) -> None:
        super().__init__()
        if not width_mult > 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        first = _divisible(32 * width_mult)
        last = _divisible(1280 * max(1.0, width_mult))

        def build() -> None:
            self.stem = _conv_bn_relu6(int(in_channels), first, 3, 2)
            blocks: list[nn.Module] = []
            c_in = first
            for t, c, n, s in self.SETTINGS:
                c_out = _divisible(c * width_mult)
                for i in range(n):
                    blocks.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, t))
                    c_in = c_out
            self.blocks = nn.Sequential(*blocks)
            self.head = _conv_bn_relu6(c_in, last)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.flatten = nn.Flatten()
            self.classifier = nn.Sequential(nn.Dropout(float(dropout)), nn.Linear(last, int(num_classes)))

        _built_quietly(build)
        _seeded_init(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.flatten(self.pool(x)))


class SelfAttention(nn.Module):
    """Multi-head self-attention written out: q/k/v Linear layers, heads by reshape, SDPA, out Linear.

    The form oamipc's unit analysis recognises: removing a head removes its ``head_dim`` rows of
    ``q``, ``k`` and ``v`` and its ``head_dim`` input columns of ``proj``.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not a multiple of the {heads} heads")
        self.heads, self.head_dim = int(heads), int(dim) // int(heads)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], x.shape[1]
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + fc2(gelu(fc1(norm2(x))))``."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), SelfAttention(dim, heads)
        self.norm2, self.fc1, self.act = nn.LayerNorm(dim), nn.Linear(dim, mlp), nn.GELU()
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """A small vision transformer (Dosovitskiy et al., 2021) for 28x28 grey images, written here.

    ``(N, in_channels, image_size, image_size) -> num_classes``: non-overlapping ``patch`` x
    ``patch`` patches embedded by a strided convolution, a learned class token and learned
    positional embeddings, ``depth`` pre-norm blocks (:class:`TransformerBlock`), a final
    LayerNorm and a Linear classifier on the class token.  The default (7x7 patches: 16 tokens
    and the class token, width 64, 4 blocks of 4 heads, MLP 128) is ``examples/fashion_vit.pt``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, patch: int = 7,
                 dim: int = 64, depth: int = 4, heads: int = 4, mlp: int = 128) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, mlp) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, tokens, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class DigitsSeq(nn.Module):
    """A small sequence model: each row of an 8x8 digit is one token of 8 pixels.

    ``(N, 1, rows, cols) -> num_classes``: the rows as ``rows`` tokens, a Linear embedding of each
    to ``dim``, learned positional embeddings, torch's own ``nn.TransformerEncoder`` (batch-first,
    pre-norm layers of ``heads`` heads and a GELU FFN of ``ffn`` units, a final LayerNorm), a mean
    over the tokens and a Linear classifier.  It uses ``nn.MultiheadAttention`` (packed ``in_proj``),
    so pruning reaches its heads through the traced stand-ins of :mod:`oamipc.attention`.  The
    default is ``examples/digits_seq.pt``.
    """

    def __init__(self, rows: int = 8, cols: int = 8, dim: int = 32, depth: int = 2, heads: int = 4,
                 ffn: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not a multiple of the head count {heads}")
        self.rows, self.cols = int(rows), int(cols)
        self.embed = nn.Linear(cols, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, rows, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, ffn, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], self.rows, self.cols)  # (N, 1, 8, 8) -> (N, 8 tokens, 8 pixels)
        x = self.encoder(self.embed(x) + self.pos_embed)
        return self.head(x.mean(1))
