"""Seeded training of dense networks from a recipe, and a disk cache of the trained weights.

The networks oamipc is measured on are trained here, not downloaded: the shipped examples
(``examples/train_examples.py``), the sweep's networks (``benchmarks/sweep.py``) and the
trained-network family (``benchmarks/family.py``).  One place holds how they are trained, so a
change of the training loop reaches all of them:

* :class:`Recipe` names the architecture (``"module:Class"`` and keyword arguments), the data
  set and the optimiser settings; :func:`build` makes the (unseeded) network and :func:`train`
  trains it with :func:`oamipc.finetune.finetune` (AdamW, cosine-decayed learning rate, label
  smoothing and input noise as the recipe says).
* :func:`load_or_train` is the cache: a state dict under a key that names everything that
  decides the weights; a file that is there is loaded instead of training again, a file that
  no longer fits the architecture is trained again and overwritten.  :func:`trained` puts the
  two together for a recipe and a seed.

Determinism: ``torch.manual_seed(seed)`` before the network is built draws its initial
weights, and the training loop draws the batch order and the input noise from its own
generator seeded with the same value.  The same torch build and thread count give the same
weights bit for bit; :func:`trained` fixes the thread count (default 1) while it trains, so the
cached weights do not depend on how many cores the machine has.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oamipc.atomic import atomic_output
from oamipc.cache import cache_root
from oamipc.checkpoint import import_object
from oamipc.data import Dataset
from oamipc.errors import UsageError
from oamipc.finetune import FinetuneConfig, FinetuneHistory, finetune

__all__ = ["Recipe", "build", "cache_root", "load_or_train", "train", "trained"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """How one network is built and trained.

    ``model_class`` is ``"module:Class"`` (built with ``model_args`` as keywords), ``data`` a
    :func:`oamipc.data.load_data` spec.  ``train_samples``: train on a stratified subset of that
    many samples of the train split, drawn with the training seed (None: the whole split).
    """

    name: str
    model_class: str
    model_args: dict[str, Any]
    data: str
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    input_noise: float = 0.0  # std of Gaussian noise added to each training batch
    train_samples: int | None = None

    def config(self, seed: int) -> FinetuneConfig:
        """The training loop's settings for ``seed`` (validated by :class:`FinetuneConfig`)."""
        return FinetuneConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, optimizer="adamw",
                              weight_decay=self.weight_decay, label_smoothing=self.label_smoothing,
                              schedule="cosine", input_noise=self.input_noise, seed=seed)

    def with_epochs(self, epochs: int) -> Recipe:
        """The same recipe trained for ``epochs`` epochs (a quick run; the cache key changes with it)."""
        return replace(self, epochs=int(epochs))

    def key(self, seed: int) -> str:
        """The cache key of this recipe trained with ``seed``: readable name, seed and epochs, and a
        hash of every field, so that any change of the recipe is a new key."""
        fields = json.dumps({**asdict(self), "seed": int(seed)}, sort_keys=True)
        digest = hashlib.sha256(fields.encode()).hexdigest()[:12]
        return f"{self.name}_s{seed}_e{self.epochs}_{digest}"


def build(recipe: Recipe) -> nn.Module:
    """The network of ``recipe``, with the initial weights of torch's global random state (seed it first)."""
    cls = import_object(recipe.model_class, error=UsageError)
    if not callable(cls):
        raise UsageError(f"recipe {recipe.name}: {recipe.model_class} is not a class or factory")
    model = cls(**recipe.model_args)
    if not isinstance(model, nn.Module):
        raise UsageError(f"recipe {recipe.name}: {recipe.model_class} made a {type(model).__name__}, not an nn.Module")
    return model


def train(model: nn.Module, data: Dataset, recipe: Recipe, seed: int) -> FinetuneHistory:
    """Train ``model`` in place on ``data`` as ``recipe`` says (:meth:`Recipe.config`); the loop
    is oamipc's fine-tuning loop, :func:`oamipc.finetune.finetune`."""
    return finetune(model, data, recipe.config(seed))


def load_or_train(path: Path, make: Callable[[], nn.Module],
                  fit: Callable[[nn.Module], dict[str, Any]]) -> tuple[nn.Module, dict[str, Any]]:
    """The network cached at ``path``, or a fresh ``make()`` trained by ``fit`` and cached there.

    ``make`` builds the untrained network (seeding is its business); ``fit`` trains it in place
    and returns what to remember about the training (JSON-ready).  The file holds
    ``{"state_dict", "training"}``, written atomically.  Returns the network in eval mode and
    the training record plus ``"cached"``: the path it was loaded from, or None when trained now.
    A file that cannot be read or does not fit the network is logged and replaced.
    """
    net = make()
    if path.is_file():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(payload["state_dict"])
            return net.eval(), {**payload["training"], "cached": str(path)}
        except (RuntimeError, KeyError, OSError, EOFError, TypeError, pickle.UnpicklingError) as exc:
            log.warning("cached %s unusable (%s); training again", path.name, type(exc).__name__)
            net = make()
    training = fit(net)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        # clone: a view would drag its whole storage into the file
        torch.save({"state_dict": {k: v.detach().clone() for k, v in net.state_dict().items()},
                    "training": training}, tmp)
    return net.eval(), {**training, "cached": None}


def trained(recipe: Recipe, train_split: Dataset, seed: int, cache: Path,
            threads: int = 1) -> tuple[nn.Module, dict[str, Any]]:
    """``recipe`` trained with ``seed`` on ``train_split`` (its stratified subset when the recipe
    says so), from ``cache / (recipe.key(seed) + ".pt")`` when there.

    Training runs on ``threads`` torch threads (restored afterwards): the weights are a function
    of the recipe, the seed and the torch build, not of the machine's core count.
    """
    def make() -> nn.Module:
        torch.manual_seed(seed)
        return build(recipe)

    def fit(net: nn.Module) -> dict[str, Any]:
        data = train_split
        if recipe.train_samples is not None and recipe.train_samples < len(data):
            data = data.stratified_sample(recipe.train_samples, seed=seed)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        start = time.perf_counter()
        try:
            history = train(net, data, recipe, seed)
        finally:
            torch.set_num_threads(before)
        log.info("trained %s seed %d: %d epochs on %d samples in %.1f s", recipe.name, seed, recipe.epochs,
                 len(data), time.perf_counter() - start)
        return {"recipe": asdict(recipe), "seed": int(seed), "train_samples": len(data), "threads": threads,
                "seconds": history.seconds, "history": history.to_dict(), "key": recipe.key(seed)}

    return load_or_train(cache / f"{recipe.key(seed)}.pt", make, fit)
