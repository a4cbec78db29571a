"""The pass library of oamipc (installed as ``oamipc.passes``), one pass or analysis per module.

Importing this package registers every pass, analysis, importance criterion and planner by name,
for pipeline strings and ``--importance``.  Only the driver (:mod:`oamipc.driver`) and the CLI
import it; the infrastructure in ``oamipc`` never does.  The MIP planner's internals live in the
subpackage :mod:`.mip`.  After pruning, :mod:`.reconstruct` refits the pruned layers to the
original network's layer outputs.
"""

from oamipc.surgery import apply_plan

from .costs import CostAnalysis, Costs, count_costs
from .dead_units import DeadUnitAnalysis, DeadUnits
from .importance_activation import ActivationImportance
from .importance_base import ImportanceAnalysis, criteria, get_criterion
from .importance_magnitude import L1Importance, L2Importance
from .importance_random import RandomImportance
from .importance_taylor import TaylorImportance
from .latency_model import LatencyModelAnalysis, plan_latency_model, plan_widths
from .mip.options import MipOptions
from .plan_greedy import PlanGreedyAnalysis, select
from .plan_mip import PlanMipAnalysis
from .plan_refit import PlanRefitSelectAnalysis
from .planner_base import PlannerAnalysis, importance_names, planner_for
from .prune_units import PruneOutcome, PruneUnitsPass
from .reconstruct import ReconstructOutcome, ReconstructPass
from .unit_groups import UnitGroupAnalysis

__all__ = [
    "ActivationImportance", "CostAnalysis", "Costs", "DeadUnitAnalysis", "DeadUnits", "ImportanceAnalysis",
    "L1Importance", "L2Importance",
    "LatencyModelAnalysis",
    "MipOptions", "PlanGreedyAnalysis", "PlanMipAnalysis", "PlannerAnalysis", "PlanRefitSelectAnalysis", "PruneOutcome",
    "PruneUnitsPass",
    "RandomImportance", "ReconstructOutcome", "ReconstructPass", "TaylorImportance", "UnitGroupAnalysis",
    "apply_plan", "count_costs", "criteria", "get_criterion", "importance_names", "plan_latency_model", "plan_widths",
    "planner_for", "select",
]
