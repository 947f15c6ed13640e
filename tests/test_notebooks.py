"""The committed notebooks are executed walkthroughs: re-run each and check that the numbers it prints are current.

What is compared is what a reader reads: each code cell's standard output, as its text with the numbers taken out
(which must match exactly) and its numbers (which must match up to one unit in the last digit printed, the most a
platform's last bits of float64 sums can move a rounded number; integers exactly). Standard error — warnings,
progress bars — is not compared, and a committed notebook must not contain any. A stale notebook is re-made with
``python scripts/make_notebooks.py``.
"""

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
NotebookClient = pytest.importorskip("nbclient").NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# A walkthrough that loads the real model takes minutes on CPU: slow, like the other real-model tests.
CASES = [pytest.param(p, marks=pytest.mark.slow) if "load_model(" in p.read_text() else p for p in NOTEBOOKS]
NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:e[-+]?\d+)?")


def stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream"
                   and o.get("name") == "stdout")


def printed(nb) -> list[tuple[str, list[str]]]:
    """Per code cell: (stdout with every number replaced by ``#``, the numbers as printed)."""
    return [(NUMBER.sub("#", stdout(c)), NUMBER.findall(stdout(c))) for c in nb.cells if c.cell_type == "code"]


def last_digit(text: str) -> float:
    """One unit in the last printed digit of a decimal number (0 for an integer: compared exactly)."""
    mantissa, _, exponent = text.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    if "." not in mantissa and not exponent:
        return 0.0
    return 10.0 ** (-decimals + int(exponent or 0))


def same_number(a: str, b: str) -> bool:
    x, y = float(a.replace(",", "")), float(b.replace(",", ""))
    return abs(x - y) <= max(last_digit(a), last_digit(b)) * (1 + 1e-9)


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no walkthroughs"


def test_the_comparison_tolerates_the_last_digit_only():
    assert same_number("0.1671", "0.1672") and same_number("1.5e-05", "1.6e-05")
    assert same_number("2,359,303", "2,359,303")
    assert not same_number("0.1671", "0.1673") and not same_number("12", "13") and not same_number("9.24", "9.34")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_print_no_warnings(path):
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        err = [o.get("text", "") for o in cell.get("outputs", [])
               if o.output_type == "stream" and o.get("name") != "stdout"]
        assert not err, f"{path.name}, code cell {i}: stderr {''.join(err)[:300]!r}"
        assert "Warning" not in stdout(cell), f"{path.name}, code cell {i}: {stdout(cell)[:300]!r}"


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.name)
def test_notebook_runs_and_its_outputs_are_current(path):
    committed = nbformat.read(path, as_version=4)
    assert all(c.get("outputs") for c in committed.cells if c.cell_type == "code"), f"{path.name} is not executed"
    fresh = nbformat.read(path, as_version=4)
    NotebookClient(fresh, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    errors = [o for c in fresh.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    stale = f"{path.name} is stale: run python scripts/make_notebooks.py"
    for i, ((text_new, nums_new), (text_old, nums_old)) in enumerate(zip(printed(fresh), printed(committed))):
        assert text_new == text_old, f"{stale} (code cell {i}: {text_new!r} != {text_old!r})"
        diff = [(a, b) for a, b in zip(nums_new, nums_old) if not same_number(a, b)]
        assert not diff, f"{stale} (code cell {i}: new vs committed {diff[:5]})"
