"""The MIP planner's internals (the OAMIP analysis), one concern per module.

* :mod:`.encoder`: the network on fixed calibration samples as MILP rows (PuLP), no dense conv matrix.
* :mod:`.bounds`: the bounds and big-M constants those rows use (interval, CROWN, sample phases) and
  the margins that keep them sound under rounding and solver tolerances.
* :mod:`.rows`: rows shared by every formulation: a group's counts, the exact MACs, plan checks.
* :mod:`.budget`: the default ``budget`` formulation, layer sub-problems from the output backwards.
* :mod:`.joint`: the joint trust-region stage over flip variables of every layer.
* :mod:`.paper`: the thesis's formulation (continuous scores, one problem per class).
* :mod:`.masked`: batched masked forward passes (flip effects, the check against the pruned network).
* :mod:`.evidence`: the held-out samples (the train split the MILP did not see) and the noise-aware
  rule that accepts a candidate plan only when they say it is better.
* :mod:`.means`: mean replacement (removed units read as their mean at Linear readers).
* :mod:`.workers`: forked worker processes for independent solves.
* :mod:`.remote`: where independent tasks run (those forked workers, or Ray tasks with the
  network sent once as picklable data); :mod:`.subproblems`: layer sub-problems solved ahead as tasks.

The pass that uses them is :class:`oamipc.passes.plan_mip.PlanMipAnalysis`; nothing here
registers a pass.
"""
