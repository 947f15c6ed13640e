"""One set of solver status codes with one meaning each, shared by :func:`~rdalloc.waterfill` and
:func:`~rdalloc.allocate` (a result carries the code as ``status``, its certificate the message as ``status_message``).

* ``OPTIMAL`` (0): the returned allocation is optimal — proven by its certificate (KKT conditions for the continuous
  problem; a zero dual gap or the exact phase for the menu problem), up to the tolerance the solver documents.
* ``FEASIBLE`` (1): within the budget, not proven optimal; the reported gap bounds how far it can be from the optimum.
* ``SATURATED`` (2): the budget buys every item its best point (``hi``, or its least distortion on the menu), so the
  budget constraint is slack; items whose extra bits would buy nothing (zero weight) stay at their cheapest point.
* ``INFEASIBLE`` (3): the budget is below the cheapest allocation (eager calls raise ``ValueError`` instead; under
  ``jax.jit`` the status says it).
* ``MAX_ITER`` (4): the iteration cap was reached before the stopping rule held.
* ``CHECK_FAILED`` (5): the solve's final check failed: its answer spends more than ``B (1 + 1e-9)``, or (continuous
  solver) claims the optimum without meeting the budget to that tolerance. Only input outside the range float64
  solves reliably (sizes, weights and distortions far apart in scale) causes it; eager calls raise ``ValueError`` for
  an overspend instead, so the code is seen under ``jax.jit`` and for a missed budget.
"""

from enum import IntEnum


class Status(IntEnum):
    """The solver status codes (integers, so they travel as ``int32`` arrays through ``jax.jit``)."""

    OPTIMAL = 0
    FEASIBLE = 1
    SATURATED = 2
    INFEASIBLE = 3
    MAX_ITER = 4
    CHECK_FAILED = 5


OPTIMAL, FEASIBLE, SATURATED, INFEASIBLE, MAX_ITER, CHECK_FAILED = Status

MESSAGES = {OPTIMAL: "optimal (proven)",
            FEASIBLE: "feasible, within the reported gap of the optimum",
            SATURATED: "budget at or above what every item's best point costs (items with zero weight at their "
                       "cheapest)",
            INFEASIBLE: "budget below the cheapest allocation",
            MAX_ITER: "iteration limit reached",
            CHECK_FAILED: "final check failed: the answer misses or exceeds its budget beyond rounding (input outside "
                          "the range float64 solves reliably)"}

__all__ = ["Status", "OPTIMAL", "FEASIBLE", "SATURATED", "INFEASIBLE", "MAX_ITER", "CHECK_FAILED", "MESSAGES"]
