"""Tools to verify an allocator or a cache against rdalloc: exact references, invariant checks and hypothesis
strategies that draw valid problems (docs/design.md §2, "Oracles").

* :mod:`~rdalloc.testing.problems` — :class:`MenuProblem` (what :func:`rdalloc.allocate` solves) and
  :class:`ContinuousProblem` (what :func:`rdalloc.waterfill` solves), with :func:`menu_table`.
* :mod:`~rdalloc.testing.references` — exact optima computed without rdalloc's solvers: brute force, a dynamic
  program on integer costs, HiGHS (MILP), cvxpy, and bisection with the closed form for water-filling.
* :mod:`~rdalloc.testing.invariants` — checks that raise ``AssertionError`` with a message saying what is wrong.
* :mod:`~rdalloc.testing.strategies` — hypothesis strategies (needs ``pip install 'rdalloc[test]'``); import it
  explicitly.

Example::

    from hypothesis import given
    from rdalloc.testing import assert_allocation, brute_force_optimum
    from rdalloc.testing.strategies import menu_problems

    @given(menu_problems(max_items=5))
    def test_my_allocator(problem):
        W, C = problem.table()
        assert_allocation(problem, my_allocate(problem), optimum=brute_force_optimum(W, C, problem.budget))
"""

from .invariants import (
    assert_allocation,
    assert_certificate,
    assert_in_box,
    assert_in_menu,
    assert_kkt,
    assert_within_budget,
)
from .problems import ContinuousProblem, MenuProblem, menu_table
from .references import bisection_waterfill, brute_force_optimum, cvxpy_waterfill, dynamic_program_optimum, milp_optimum

__all__ = ["MenuProblem", "ContinuousProblem", "menu_table",
           "brute_force_optimum", "dynamic_program_optimum", "milp_optimum", "cvxpy_waterfill", "bisection_waterfill",
           "assert_within_budget", "assert_in_menu", "assert_in_box", "assert_kkt", "assert_certificate",
           "assert_allocation"]
