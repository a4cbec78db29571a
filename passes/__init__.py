"""The pass library of oamipc (installed as ``oamipc.passes``), one pass or analysis per module.

Importing this package registers every pass, analysis and importance criterion by name, for
pipeline strings and ``--importance``.  Only the driver (:mod:`oamipc.driver`) and the CLI
import it; the infrastructure in ``oamipc`` never does.
"""

from .costs import CostAnalysis, Costs, count_costs
from .importance_activation import ActivationImportance
from .importance_base import ImportanceAnalysis, criteria, get_criterion
from .importance_magnitude import L1Importance, L2Importance
from .importance_mip import MipImportance
from .importance_random import RandomImportance
from .importance_taylor import TaylorImportance
from oamipc.surgery import apply_plan

from .prune_units import PruneUnitsPass
from .select_units import SelectUnitsAnalysis, select
from .unit_groups import UnitGroupAnalysis

__all__ = [
    "ActivationImportance", "CostAnalysis", "Costs", "ImportanceAnalysis", "L1Importance", "L2Importance", "MipImportance",
    "PruneUnitsPass", "RandomImportance", "SelectUnitsAnalysis", "TaylorImportance", "UnitGroupAnalysis",
    "apply_plan", "count_costs", "criteria", "get_criterion", "select",
]
