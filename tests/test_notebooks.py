"""The committed notebooks are executed walkthroughs: re-run each and check its printed outputs are still current.

Numbers are compared at 6 significant digits (the last bits of float64 sums may differ between CPUs); any other
difference means the notebook is stale: re-run ``python scripts/make_notebooks.py``.
"""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# A walkthrough that loads the real model takes minutes on CPU: slow, like the other real-model tests.
CASES = [pytest.param(p, marks=pytest.mark.slow) if "load_model(" in p.read_text() else p for p in NOTEBOOKS]
NUMBER = re.compile(r"-?\d+\.\d+(?:e[-+]?\d+)?|-?\d+e[-+]?\d+")


def printed(nb) -> list[str]:
    """Each code cell's stream output, with numbers rounded to 6 significant digits."""
    out = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            text = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")
            out.append(NUMBER.sub(lambda m: f"{float(m.group()):.6g}", text))
    return out


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no walkthroughs"


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.name)
def test_notebook_runs_and_its_outputs_are_current(path):
    committed = nbformat.read(path, as_version=4)
    assert all(c.get("outputs") for c in committed.cells if c.cell_type == "code"), f"{path.name} is not executed"
    fresh = nbformat.read(path, as_version=4)
    NotebookClient(fresh, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    errors = [o for c in fresh.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    assert printed(fresh) == printed(committed), f"{path.name} is stale: run python scripts/make_notebooks.py"
