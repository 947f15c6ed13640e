"""Write and execute the walkthrough notebooks in notebooks/ (outputs are committed so they read without running).

    python scripts/make_notebooks.py        # needs nbformat, nbclient, ipykernel
"""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]

SOLVER = [
    ("md", """# rdalloc in ten minutes: water-filling, menus with eviction, certificates

This notebook solves the bundled allocation problem — the per-head K/V distortion curves of **SmolLM2-135M-Instruct**
under KIVI quantization, measured on real K/V (`scripts/make_problem.py`) — continuously and on integer menus, and reads
the certificates."""),
    ("code", """import json, numpy as np
from importlib import resources
import rdalloc
from rdalloc import allocate, waterfill, model_from_dict, Plan

problem = json.loads(resources.files("rdalloc.data").joinpath("smollm2_problem.json").read_text())
model = model_from_dict(problem["model"])
sizes, metadata = np.asarray(problem["sizes"]), np.asarray(problem["metadata"])
print(problem["note"]); print(model.n_items, "items; beta (keys, values) =", model.beta[0], model.beta[-1])"""),
    ("md", """## Continuous reverse water-filling
`waterfill` is exact: the KKT residual is at rounding level and the budget is met to machine precision."""),
    ("code", """r = waterfill(model, sizes, average_bits=3.0, metadata=metadata)
cert = r.to_dict(); cert.pop("bits")
print(json.dumps(cert, indent=1))
print("bits range:", float(np.min(r.bits)), "to", float(np.max(r.bits)))"""),
    ("md", """## Integer bits, metadata charged
`allocate` keeps each item's lower convex hull, finds one exact Lagrangian threshold and fills the slack greedily.
The dual bound `q(lambda*)` certifies the answer: a gap of 0 means proven optimal."""),
    ("code", """a = allocate(model, sizes, average_bits=3.0, metadata=metadata, menu=range(1, 9))
print(json.dumps(a.certificate(), indent=1))
plan = Plan.from_allocation(a, (30, 3), quantizer="kivi")
print("key bits per layer x head:\\n", plan.key.T)"""),
    ("md", """## A rate-distortion curve with its certificate
Distortion of the integer solution, its dual lower bound and the continuous optimum as the budget grows."""),
    ("code", """import matplotlib.pyplot as plt
budgets = np.linspace(2.05, 8.9, 40)
ints = [allocate(model, sizes, average_bits=b, metadata=metadata, menu=range(1, 9)) for b in budgets]
cont = [waterfill(model, sizes, average_bits=b, metadata=metadata, hi=8.0) for b in budgets]
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.semilogy(budgets, [float(x.distortion) for x in ints], "o", ms=3, label="integer (allocate)")
ax.semilogy(budgets, [float(x.lower_bound) for x in ints], "-", label="dual bound q(lambda*)")
ax.semilogy(budgets, [float(x.distortion) for x in cont], "--", label="continuous (waterfill)")
ax.set_xlabel("average bits per element (metadata charged)"); ax.set_ylabel("sum of MSE"); ax.legend(); plt.show()
print("largest relative gap:", max(x.relative_gap for x in ints))"""),
    ("md", """## Eviction as the zero-bit endpoint
Give each head an eviction distortion (here: the energy of its K or V, what dropping it loses) and a menu with 0
and 16; heads whose information is cheap to lose are evicted, the rest quantized."""),
    ("code", """from rdalloc import ExponentialModel
ev = model.alpha * 0.5  # an illustrative eviction distortion per head
m2 = ExponentialModel(model.alpha, model.beta, eviction=ev, lo=1, hi=8, quantizer="kivi")
e = allocate(m2, sizes, average_bits=1.5, metadata=metadata, menu=(0, 1, 2, 3, 4, 6, 8, 16))
print({int(b): int(c) for b, c in zip(*np.unique(np.asarray(e.bits), return_counts=True))})
print(json.dumps({k: e.certificate()[k] for k in ("average_bits", "average_payload_bits", "relative_gap", "status_message")}))"""),
]


def build(cells, path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                for kind, src in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    nbformat.write(nb, path)
    print("wrote", path)


if __name__ == "__main__":
    (ROOT / "notebooks").mkdir(exist_ok=True)
    build(SOLVER, ROOT / "notebooks" / "01_solver_walkthrough.ipynb")
