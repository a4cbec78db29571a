"""First-order Taylor importance (Molchanov et al. 2019): the loss change a unit's removal causes.

For each unit, ``(sum over its weights and bias of w * dL/dw)^2`` on a calibration batch, summed
over batches of ``BATCH`` samples; ``L`` is the cross-entropy on the labels.  Coupled producers add their terms
before squaring (they are removed together).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import fx

from oamipc.passmanager import AnalysisManager, register
from oamipc.units import UnitGraph

from .importance_base import ImportanceAnalysis, register_criterion, samples_per_pass

#: Samples whose gradient sums are squared together (the score's definition).  Each group runs in
#: passes of at most :func:`.importance_base.samples_per_pass` samples whose gradients are added.
BATCH = 128


@register
@register_criterion
@dataclass(frozen=True)
class TaylorImportance(ImportanceAnalysis):
    """Squared first-order Taylor estimate of the loss change when a unit is removed."""

    name: ClassVar[str] = "importance-taylor"
    criterion: ClassVar[str] = "taylor"
    needs_data: ClassVar[bool] = True
    needs_labels: ClassVar[bool] = True

    def scores(self, gm: fx.GraphModule, graph: UnitGraph, am: AnalysisManager) -> np.ndarray:
        x, y = am.context.calib_x, am.context.calib_y
        assert x is not None and y is not None
        targets = sorted({layer.target for layer in graph.layers})
        params = {t: [p for p in (gm.get_submodule(t).weight, getattr(gm.get_submodule(t), "bias", None))
                      if p is not None] for t in targets}
        flat = [p for t in targets for p in params[t]]
        was_training = gm.training
        gm.eval()
        total = np.zeros(graph.n_units)
        step = samples_per_pass(gm, int(am.context.example_inputs[0].shape[0]), BATCH, backward=True)
        try:
            for start in range(0, len(x), BATCH):
                contrib: dict[str, torch.Tensor] = {}
                for part in range(start, min(start + BATCH, len(x)), step):
                    end = min(part + step, start + BATCH)
                    out = gm(x[part:end])
                    logits = out[0] if isinstance(out, (tuple, list)) else out
                    loss = torch.nn.functional.cross_entropy(logits, y[part:end], reduction="sum")
                    grads = torch.autograd.grad(loss, flat, allow_unused=True)
                    gmap = {id(p): g for p, g in zip(flat, grads)}
                    del out, logits, loss, grads
                    for t in targets:
                        for p in params[t]:
                            g = gmap.get(id(p))
                            if g is None:
                                continue
                            term = (p.detach() * g).double().reshape(p.shape[0], -1).sum(dim=1)
                            contrib[t] = term if t not in contrib else contrib[t] + term
                per_unit = np.zeros(graph.n_units)
                sums = {t: c.numpy() for t, c in contrib.items()}
                for unit, members in graph.members.items():
                    per_unit[unit] = sum(float(sums[t][c]) for t, c in members if t in sums)
                total += per_unit**2
        finally:
            gm.train(was_training)
        return total / max(len(x), 1)
