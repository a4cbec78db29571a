"""Choosing, among candidate pruned networks, the one that fine-tunes best.

Why: without retraining the ``mip`` criterion is the most accurate on 18 of the sweep's 20 rows,
but after a short fine-tune it is ahead on only 5 (benchmarks/RESULTS.md, "The sweep"): its
objective rewards the accuracy a plan has now, not the accuracy it can reach after training,
and no cheap statistic of the weights tells which plan will train best.  So it is measured.

How: the candidates are the network the asked criterion made and those of the solver-free
criteria (:data:`CANDIDATES`) at the same target, made by the same compile.  The train split is
cut in two, seeded: a held-out part (:data:`HELDOUT_FRACTION`, at most :data:`HELDOUT_MAX`
samples, never trained on here) and the rest.  Each candidate, copied, is fine-tuned on a
slice of the rest with the user's own settings (optimizer, learning rate, batch size, seed,
schedule) for :data:`PROBE_FRACTION` of the sample passes of the real fine-tune, and judged by
its accuracy on the held-out part.  The asked criterion's network is kept unless another's
held-out accuracy is higher by more than :data:`MARGIN_SAMPLES` held-out samples' worth: a
difference of one or two samples is noise, not evidence.  The chosen network is then
fine-tuned in full, from its state before the probe, on the whole train split as without
selection.  The test split is never looked at.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from oamipc.data import Dataset, accuracy
from oamipc.finetune import FinetuneConfig, finetune

log = logging.getLogger(__name__)

#: The solver-free criteria whose networks compete with the asked criterion's.
CANDIDATES: tuple[str, ...] = ("l1", "taylor", "activation")
#: The probe's sample passes, as a fraction of the real fine-tune's (epochs x train samples).
PROBE_FRACTION = 0.25
#: The share of the train split held out to judge the probes, and its cap.
HELDOUT_FRACTION = 0.2
HELDOUT_MAX = 2000
#: Another candidate replaces the asked one only when ahead by more than this many held-out samples.
MARGIN_SAMPLES = 2


@dataclass(frozen=True)
class Probe:
    """One candidate's short fine-tune: accuracy on the held-out train samples before and after."""

    criterion: str
    accuracy_before: float
    accuracy_after: float
    seconds: float


@dataclass(frozen=True)
class Selection:
    """Which candidate was chosen, why, and every probe."""

    chosen: int
    probes: tuple[Probe, ...]
    heldout_samples: int
    probe_samples: int
    probe_epochs: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.probes[self.chosen].criterion, "reason": self.reason,
                "heldout_samples": self.heldout_samples, "probe_samples": self.probe_samples,
                "probe_epochs": self.probe_epochs, "margin_samples": MARGIN_SAMPLES,
                "probe_fraction": PROBE_FRACTION, "probes": [dataclasses.asdict(p) for p in self.probes]}


def split_train(train: Dataset, seed: int) -> tuple[Dataset, Dataset]:
    """(held-out part, the rest) of ``train``, by a seeded permutation."""
    n = len(train)
    held = max(1, min(HELDOUT_MAX, int(round(HELDOUT_FRACTION * n))))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return train.subset(perm[:held]), train.subset(perm[held:])


def select(candidates: Sequence[tuple[str, nn.Module]], train: Dataset, config: FinetuneConfig) -> Selection:
    """Probe every candidate (the first is the asked criterion's) and choose one; modules are not changed."""
    heldout, rest = split_train(train, config.seed)
    passes = max(config.batch_size, int(round(PROBE_FRACTION * config.epochs * len(train))))
    probe_epochs = max(1, -(-passes // max(1, len(rest))))
    probe_set = rest.subset(slice(0, min(len(rest), -(-passes // probe_epochs))))
    probe_config = dataclasses.replace(config, epochs=probe_epochs, eval_every=probe_epochs)
    probes = []
    for name, module in candidates:
        start = time.perf_counter()
        trial = copy.deepcopy(module)
        before = accuracy(trial, heldout)
        finetune(trial, probe_set, probe_config)
        after = accuracy(trial, heldout)
        probes.append(Probe(name, before, after, time.perf_counter() - start))
        log.info("fine-tune probe %s: held-out accuracy %.4f -> %.4f", name, before, after)
    best = max(range(len(probes)), key=lambda i: (probes[i].accuracy_after, -i))
    lead = (probes[best].accuracy_after - probes[0].accuracy_after) * len(heldout)
    if best != 0 and lead > MARGIN_SAMPLES + 1e-9:
        reason = (f"{probes[best].criterion} fine-tuned best: {100 * probes[best].accuracy_after:.2f}% on "
                  f"{len(heldout)} held-out train samples against {100 * probes[0].accuracy_after:.2f}% for "
                  f"{probes[0].criterion}")
        chosen = best
    else:
        chosen = 0
        reason = (f"{probes[0].criterion} kept: no candidate fine-tuned better by more than {MARGIN_SAMPLES} of "
                  f"{len(heldout)} held-out train samples")
    log.info("fine-tune selection: %s", reason)
    return Selection(chosen, tuple(probes), len(heldout), len(probe_set), probe_epochs, reason)
