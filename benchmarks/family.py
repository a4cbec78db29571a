"""A family of trained networks to choose defaults on one half and report them on the other.

The MIP's defaults were tuned on the four shipped examples; numbers measured on those same four
networks cannot say whether the defaults carry to networks they were not tuned on.  This module
defines twelve small architectures (MLPs of 2, 3 and 4 hidden layers at several widths, CNNs
with and without batch norm, LeNet-5 with max and with average pooling; on the 8x8 digits and on
Fashion-MNIST), each trained for :data:`SEEDS`, and splits them into two halves **by
architecture**:

* ``tune`` -- the six architectures closest to the shipped examples (the same shape, or the
  same kind of network on the same data): the examples the defaults were chosen on belong here,
  and so does any further tuning of defaults;
* ``report`` -- the other six, each the counterpart of a ``tune`` architecture that differs in
  depth, width, batch norm or pooling.  Numbers that claim a default generalises come from here.

A half holds every seed of its architectures, so the report half never shares an architecture
with the tune half (a split by seed would).  The split is :data:`HALVES`, written out; nothing
is drawn at random.

Training is :func:`oamipc.training.trained`: seeded, deterministic, on one torch thread, and
cached as a state dict under ``$OAMIPC_CACHE_DIR/family`` (default ``~/.cache/oamipc/family``),
keyed by architecture, seed, data, epochs and a hash of the whole recipe.  The recipes are
the shipped examples' (``examples/train_examples.py``: AdamW, cosine learning rate, weight decay
0.05, label smoothing 0.1, input noise 0.1 on digits); Fashion-MNIST trains on a stratified
20,000-image subset for 8 epochs so that the whole family trains cold in about five minutes on
two cores.  Pruning and accuracy use the whole data sets (``oamipc.load_data``), as the CLI's
``--data digits`` / ``--data fashion-mnist`` would.

Two wider CNNs, :data:`WIDE` (SmallVGG and SmallResNet on Fashion-MNIST, convolutions of 16,
32 and 64 channels), sit outside the twelve: the twelve's CNNs are 8 or 16 channels wide, so
none of them has a group of several channel blocks, which is what the rule of
:func:`oamipc.target.below_block` for such groups needs to be judged on.  They are split the
same way (SmallVGG tune, SmallResNet report) but are members of a half only when named
(``--members fashion-vgg``), so that the family's runs and their numbers stay as they were.

Used by ``benchmarks/mip_quality.py --family tune|report|all``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oamipc.data import DataSplits, load_data
from oamipc.training import Recipe, cache_root, trained

__all__ = ["ARCHITECTURES", "HALVES", "SEEDS", "WIDE", "Member", "cache_dir", "example_input", "half_of", "members",
           "network", "splits"]

SEEDS: tuple[int, ...] = (0, 1)
INPUT_SHAPES: dict[str, tuple[int, ...]] = {"digits": (1, 8, 8), "fashion-mnist": (1, 28, 28)}

# The shipped examples' recipes, per data set (examples/train_examples.py); digits: 1,258 train images.
_DIGITS: dict[str, Any] = {"data": "digits", "epochs": 40, "batch_size": 32, "lr": 2e-3, "weight_decay": 0.05,
                           "label_smoothing": 0.1, "input_noise": 0.1}
# Fashion-MNIST: a stratified 20,000-image subset, 8 epochs at lr 3e-3 (LeNet-5 reaches 87%, 2 points
# below the shipped one trained on all 60,000 for 8 epochs; about 25 s per network on one thread).
_FASHION: dict[str, Any] = {"data": "fashion-mnist", "epochs": 8, "batch_size": 128, "lr": 3e-3,
                            "weight_decay": 0.05, "label_smoothing": 0.1, "train_samples": 20_000}


def _mlp(name: str, hidden: tuple[int, ...], recipe: dict[str, Any]) -> Recipe:
    if recipe["data"] == "digits":
        return Recipe(name, "oamipc.models:DigitsMLP", {"hidden": list(hidden)}, **recipe)
    return Recipe(name, "oamipc.models:PaperMLP", {"hidden": list(hidden), "in_features": 784}, **recipe)


def _cnn(name: str, batch_norm: bool, recipe: dict[str, Any]) -> Recipe:
    args: dict[str, Any] = ({"widths": [16, 32], "image_size": 8, "hidden": 64} if recipe["data"] == "digits"
                            else {"widths": [8, 16], "image_size": 28, "hidden": 64})
    return Recipe(name, "oamipc.models:SmallCNN", {**args, "batch_norm": batch_norm}, **recipe)


def _lenet(name: str, pool: str) -> Recipe:
    return Recipe(name, "oamipc.models:LeNet5", {"pool": pool}, **_FASHION)


def _wide(name: str, model_class: str) -> Recipe:
    return Recipe(name, f"oamipc.models:{model_class}", {"widths": [16, 32, 64]}, **_FASHION)


#: The twelve architectures and the two wide CNNs (one recipe each), by name.
ARCHITECTURES: dict[str, Recipe] = {r.name: r for r in (
    _mlp("digits-mlp2x128", (128, 128), _DIGITS),
    _mlp("digits-mlp3x96", (96, 96, 96), _DIGITS),
    _mlp("digits-mlp4x64", (64, 64, 64, 64), _DIGITS),
    _cnn("digits-cnn-bn", True, _DIGITS),
    _cnn("digits-cnn", False, _DIGITS),
    _mlp("fashion-mlp2x256", (256, 128), _FASHION),
    _mlp("fashion-mlp3x200", (200, 100, 100), _FASHION),
    _mlp("fashion-mlp4x128", (128, 96, 64, 32), _FASHION),
    _cnn("fashion-cnn-bn", True, _FASHION),
    _cnn("fashion-cnn", False, _FASHION),
    _lenet("fashion-lenet5-max", "max"),
    _lenet("fashion-lenet5-avg", "avg"),
    _wide("fashion-vgg", "SmallVGG"),
    _wide("fashion-resnet", "SmallResNet"),
)}

#: The split, by architecture.  tune: the shipped examples' shapes (digits MLP 128-128, digits
#: CNN with batch norm, Fashion MLP 200-100-100, LeNet-5 with max pooling) and two more, one MLP
#: and one CNN, so that each half has MLPs of 2-4 hidden layers between them, a CNN with and
#: one without batch norm, and a LeNet-5.  report: the counterparts.
HALVES: dict[str, tuple[str, ...]] = {
    "tune": ("digits-mlp2x128", "digits-mlp4x64", "digits-cnn-bn", "fashion-mlp3x200", "fashion-cnn",
             "fashion-lenet5-max"),
    "report": ("digits-mlp3x96", "digits-cnn", "fashion-mlp2x256", "fashion-mlp4x128", "fashion-cnn-bn",
               "fashion-lenet5-avg"),
}

#: The wider CNNs (groups of 16, 32 and 64 channels), by half; members only when named (module docstring).
WIDE: dict[str, tuple[str, ...]] = {"tune": ("fashion-vgg",), "report": ("fashion-resnet",)}


@dataclass(frozen=True)
class Member:
    """One trained network of the family: an architecture's recipe, a seed, and its half."""

    recipe: Recipe
    seed: int
    half: str

    @property
    def architecture(self) -> str:
        return self.recipe.name

    @property
    def name(self) -> str:
        return f"{self.recipe.name}-s{self.seed}"

    @property
    def data(self) -> str:
        return self.recipe.data

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape (without the batch dimension)."""
        return INPUT_SHAPES[self.recipe.data]


def half_of(architecture: str) -> str:
    """The half (``tune`` or ``report``) that holds ``architecture``."""
    for halves in (HALVES, WIDE):
        for half, names in halves.items():
            if architecture in names:
                return half
    raise KeyError(f"{architecture} is in no half of the family")


def members(half: str = "all", seeds: tuple[int, ...] = SEEDS, names: tuple[str, ...] | None = None,
            epochs: int | None = None) -> list[Member]:
    """The family's members of ``half`` (``tune``, ``report`` or ``all``), architecture by architecture.

    ``names`` keeps only those architectures or members (``digits-cnn`` or ``digits-cnn-s1``; the
    :data:`WIDE` ones are members only when named);
    ``epochs`` overrides every recipe's epochs (a quick run; a separate cache entry).
    """
    if half not in ("all", *HALVES):
        raise ValueError(f"unknown half {half!r}: choose from all, {', '.join(HALVES)}")
    chosen = [a for h, archs in HALVES.items() if half in ("all", h) for a in archs]
    if names is not None:
        chosen += [a for h, archs in WIDE.items() if half in ("all", h) for a in archs]
    out = []
    for arch in chosen:
        recipe = ARCHITECTURES[arch] if epochs is None else ARCHITECTURES[arch].with_epochs(epochs)
        for seed in seeds:
            member = Member(recipe, int(seed), half_of(arch))
            if names is None or arch in names or member.name in names:
                out.append(member)
    if names is not None:
        known = {a for a in ARCHITECTURES} | {f"{a}-s{s}" for a in ARCHITECTURES for s in seeds}
        unknown = sorted(set(names) - known)
        if unknown:
            raise ValueError(f"unknown family member(s) {', '.join(unknown)}: choose from {', '.join(ARCHITECTURES)} "
                             f"(optionally with -s<seed>)")
    return out


def cache_dir() -> Path:
    """Where the family's trained weights are cached: ``$OAMIPC_CACHE_DIR/family`` or ``~/.cache/oamipc/family``."""
    return cache_root() / "family"


@functools.cache
def splits(data: str) -> DataSplits:
    """The whole train and test splits of ``data`` (loaded once per process)."""
    return load_data(data)


def network(member: Member, cache: Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """``member``'s trained network (eval mode) and its training record, trained now or read from ``cache``."""
    return trained(member.recipe, splits(member.data).train, member.seed, cache or cache_dir())


def example_input(member: Member) -> torch.Tensor:
    """A zero input of one sample, the shape ``member``'s network takes."""
    return torch.zeros(1, *member.input_shape)
