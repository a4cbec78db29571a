"""The MIP planner's options: one frozen value, validated when it is made.

They are the fields of :class:`oamipc.passes.plan_mip.PlanMipAnalysis` (so a pipeline string can
set any of them: ``plan-mip{solver=cbc,time-limit=20}``) and part of its cache key.  The CLI's
``--formulation``, ``--solver``, ``--time-limit``, ... build one; the Python API accepts one or a
mapping of its field names (``mip_options={"time_limit": 5}``).  A missing solver is refused
here, before any MILP work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from oamipc.errors import UsageError
from oamipc.executor import EXECUTORS, require_ray
from oamipc.solver import require_solver

from .bounds import BOUNDS
from .evidence import RULES

DEFAULT_SAMPLES = 64  # MILP samples of the budget formulation when --mip-samples is not given


@dataclass(frozen=True)
class MipOptions:
    """Settings of the MIP planner (CLI: ``--formulation``, ``--solver``, ``--time-limit``, ...).

    Messages name options by their field names, which the CLI flags spell with dashes.
    """

    formulation: str = "budget"
    solver: str = "highs"
    time_limit: float = 20.0  # seconds per solve: a safety net (node limits end solves reproducibly)
    total_time_limit: float = 120.0  # seconds for all sub-problems
    gap: float | None = None
    threads: int | None = None
    samples: int | None = None  # MILP samples: budget 64 (stratified); paper one per class
    jobs: int = 1  # workers for independent tasks (class problems, sub-problems, radii, flip effects)
    # Where those tasks run (:mod:`.remote`): local (forked processes) | ray (Ray tasks: an embedded
    # local Ray with ``jobs`` CPUs, or the running cluster at ``ray_address``).  Never changes the plan.
    executor: str = "local"
    ray_address: str | None = None
    relax: bool = False  # paper: solve the LP relaxation
    mean_replacement: bool = False  # model removed units as their mean at Linear readers; kept if held-out says so
    bounds: str = "crown"  # crown | interval | sample (the thesis's per-sample phases; not sound)
    tau: float = 0.1  # paper: the thesis's score threshold, reported next to the ranked plan
    # Held-out samples that judge every move: the train split less the MILP samples (calibration samples
    # without one); None: as many as a bounded amount of forward work allows (:func:`.evidence.holdout_size`).
    holdout: int | None = None
    sweeps: int = 1
    warm: str = "auto"  # a criterion name, or the best cheap one on held-out data
    joint: bool = True  # the joint linearised stage after the layer sub-problems
    joint_radius: int = 0  # first trust radius (units flipped); 0: a tenth of the free units, at least 4
    joint_rounds: int = 30
    joint_nodes: int = 100  # branch-and-bound nodes per joint solve (a deterministic work limit)
    layer_nodes: int = 500  # branch-and-bound nodes per layer sub-problem (a deterministic work limit)
    joint_rivals: int = 2  # hinge rows per sample in the joint stage: the strongest other classes
    # Multiply-accumulates per plan for exact flip effects in the joint stage: when measuring every
    # free unit costs more, the units a first-order screen ranks best are measured up to this much.
    joint_exact_macs: float = 2e12
    device: str = "auto"  # torch device of the analysis's forward passes: auto (CUDA when usable) | cpu | cuda[:N]
    # Layer sub-problems with more possible ReLU/max-pool binaries are left to the joint stage.
    exact_binaries: int = 4000
    # ... and so are those whose symbolic values and hinge rows would hold more (bytes: samples x free
    # units x (8 x the elements downstream of the group's readers + 67 x (classes - 1))): the encoder's
    # per-sample coefficients are dense, and a group read by the classifier is in every hinge row.
    exact_bytes: float = 2.0 * 2**30
    margin_cap: float = 1.0  # hinge targets capped at this quantile of the original margins (1: no cap)
    # Held-out acceptance (:mod:`.evidence`): paired (accuracy not lower, and accuracy or hinge better
    # beyond noise) | hinge (any lower mean hinge) | accuracy (fewer errors, hinge breaks ties).
    accept: str = "paired"
    accept_z: float = 1.645  # paired: one-sided z a gain must reach (1.645: 5%)
    accept_loss_z: float = 0.0  # paired: a move whose accuracy z is below -this is refused (0: any loss)
    # Budget target: no MILP may lower the MACs of the plan it starts from (it swaps or adds units,
    # never only drops them), so the plan keeps the capacity a later fine-tune needs.
    spend_budget: bool = True

    def __post_init__(self) -> None:
        opts = self
        if opts.formulation not in ("budget", "paper"):
            raise UsageError(f"MIP formulation {opts.formulation!r} is unknown: use 'budget' (default) or 'paper'")
        if opts.mean_replacement and opts.formulation != "budget":
            raise UsageError("mean_replacement applies to the 'budget' formulation only")
        if opts.relax and opts.formulation != "paper":
            raise UsageError("relax (the LP relaxation) applies to the 'paper' formulation only")
        if opts.bounds not in BOUNDS:
            raise UsageError(f"MIP bounds {opts.bounds!r} are unknown: use one of {', '.join(BOUNDS)}")
        if not opts.joint_exact_macs > 0:
            raise UsageError(f"MIP joint_exact_macs must be positive, got {opts.joint_exact_macs:g}")
        analysis_device(opts.device)  # an unknown or unusable device fails here, before any work
        if opts.jobs < 1:
            raise UsageError(f"MIP jobs must be >= 1, got {opts.jobs}")
        if opts.executor not in EXECUTORS:
            raise UsageError(f"MIP executor {opts.executor!r}: use one of {', '.join(EXECUTORS)}")
        if opts.ray_address is not None and opts.executor != "ray":
            raise UsageError("--ray-address needs --executor ray")
        if opts.executor == "ray":
            require_ray()  # a missing Ray fails here, with how to install it
        if opts.samples is not None and opts.samples < 1:
            raise UsageError(f"MIP samples must be >= 1, got {opts.samples}")
        if opts.time_limit <= 0 or opts.total_time_limit <= 0:
            raise UsageError(f"MIP time limits must be positive, got time_limit={opts.time_limit:g}, "
                             f"total_time_limit={opts.total_time_limit:g}")
        if opts.accept not in RULES:
            raise UsageError(f"MIP acceptance {opts.accept!r}: use one of {', '.join(RULES)}")
        if not opts.accept_z >= 0:
            raise UsageError(f"MIP accept_z must be >= 0, got {opts.accept_z}")
        if not opts.accept_loss_z >= 0:
            raise UsageError(f"MIP accept_loss_z must be >= 0, got {opts.accept_loss_z}")
        if opts.holdout is not None and opts.holdout < 1:
            raise UsageError(f"MIP holdout must be >= 1 sample, got {opts.holdout}")
        if not 0.0 < opts.margin_cap <= 1.0:
            raise UsageError(f"MIP margin cap {opts.margin_cap}: give a quantile in (0, 1]")
        if opts.gap is not None and opts.gap < 0:
            raise UsageError(f"MIP gap must be >= 0, got {opts.gap}")
        if opts.threads is not None and opts.threads < 1:
            raise UsageError(f"MIP solver threads must be >= 1, got {opts.threads}")
        require_solver(opts.solver)  # a missing solver fails here, before minutes of other work

    @classmethod
    def of(cls, value: MipOptions | Mapping[str, Any] | None) -> MipOptions:
        """Options from a MipOptions, a mapping of its field names (the API's ``mip_options``) or None."""
        if value is None or isinstance(value, MipOptions):
            return value or cls()
        unknown = set(value) - {f.name for f in fields(cls)}
        if unknown:
            raise UsageError(f"unknown MIP option(s): {', '.join(sorted(unknown))}; known: "
                             f"{', '.join(f.name for f in fields(cls))}")
        return cls(**dict(value))

    def torch_device(self) -> torch.device:
        """The device the analysis's forward passes run on (``auto``: CUDA when usable, else CPU)."""
        return analysis_device(self.device)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def analysis_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when torch can use a GPU, else ``cpu``; ``cpu`` / ``cuda[:N]`` as given,
    refused when unknown or when CUDA is asked for and torch cannot use it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"MIP device {name!r} is unknown: use auto, cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"MIP device {name!r} is unknown: use auto, cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"MIP device {name!r} asked for, but torch sees no usable CUDA GPU on this machine; "
                         "use --device cpu (or auto)")
    return device
