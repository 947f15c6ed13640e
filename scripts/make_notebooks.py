"""Write and execute the walkthrough notebooks in notebooks/ (outputs are committed so they read without running).

    python scripts/make_notebooks.py [NAME ...]   # needs nbformat, nbclient, ipykernel; default: all
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
from rdalloc import allocate, waterfill, Plan
from rdalloc.models import model_from_dict

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
`allocate` keeps each item's lower convex hull, finds one exact Lagrangian threshold and fills the slack greedily; an
exact phase then fixes the items that cannot move and solves the few that can exactly. The dual bound `q(lambda*)`
and the exact phase's bound certify the answer: status 0 means proven optimal."""),
    ("code", """a = allocate(model, sizes, average_bits=3.0, metadata=metadata, menu=range(1, 9))
print(json.dumps(a.certificate(), indent=1))
plan = Plan.from_allocation(a, (30, 3), quantizer="kivi")
print("key bits per layer x head:\\n", plan.key.T)"""),
    ("md", """## A rate-distortion curve with its certificate
Distortion of the integer solution, its dual lower bound and the continuous optimum as the budget grows; the gap
left is the largest distance to the proven lower bound (0 where the exact phase finished)."""),
    ("code", """import matplotlib.pyplot as plt
budgets = np.linspace(2.05, 8.9, 40)
ints = [allocate(model, sizes, average_bits=b, metadata=metadata, menu=range(1, 9)) for b in budgets]
cont = [waterfill(model, sizes, average_bits=b, metadata=metadata, hi=8.0) for b in budgets]
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.semilogy(budgets, [float(x.distortion) for x in ints], "o", ms=3, label="integer (allocate)")
ax.semilogy(budgets, [float(x.dual_bound) for x in ints], "-", label="dual bound q(lambda*)")
ax.semilogy(budgets, [float(x.distortion) for x in cont], "--", label="continuous (waterfill)")
ax.set_xlabel("average bits per element (metadata charged)"); ax.set_ylabel("sum of MSE"); ax.legend(); plt.show()
print("largest relative gap:", max(x.relative_gap for x in ints), "; proven optimal:",
      sum(int(x.status) == 0 for x in ints), "of", len(ints))"""),
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


JOINT = [
    ("md", """# Compress after prefill: one budget for eviction and quantization of a real KV cache

The bundled **SmolLM2-135M-Instruct** prefills 1024 tokens of `pydoc_data.topics`; rdalloc scores every
(layer, kv-head, token) from the last 32 queries, puts the heads in the loss's units with a Fisher importance measured
on a disjoint window, and decides bits from 16 down to 0 (evicted) for token values and key channels under **one**
budget across all 30 layers x 3 heads. The plan is packed into real bytes and decoding goes on from the compressed
cache, an evicted token masked in its own head only (`python -m experiments.joint_grid` runs the full experiment). The model runs in
float64: in float32 the CPU's SIMD kernels move low-bit results in their second digit."""),
    ("code", """import warnings
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's note about notebook widgets
import numpy as np, torch
from rdalloc.backends.hf import load_model
from rdalloc.backends.hf.compat import generate
from rdalloc.backends.hf.text import text_windows
from rdalloc.backends.hf.capture import fisher_importance
from rdalloc.backends.hf.compress import CompressedCache, JointAttention, observe_prefill, scale_heads, token_weights
from rdalloc.backends.hf.joint import (allocate_joint, continuation_logits, continuation_scores, eviction_plan,
                                      measure_errors)

torch.manual_seed(0)
model, tokenizer, facts = load_model(dtype="float64", progress=False)  # float64: the same numbers on any CPU
C, M = 1024, 65  # context tokens, continuation tokens (teacher-forced, 64 scored)
tw = text_windows(tokenizer, length=C + M, calibration=1, evaluation=1)
ids = tw.evaluation[0]
pre = observe_prefill(model, ids[:C], window=32)
print(facts.name, "- prefill K/V [layers, kv_heads, tokens, head_dim] =", tuple(pre.keys.shape))"""),
    ("md", """## Weights, errors and one plan at 10 % of the FP16 bytes
Token weights are RDKV's attention weighting (`token_weights`' default), scaled per head by the Fisher importance so
that a unit of error costs what it costs the loss, in nats per token (`scale_heads`): the configuration measured best
on two texts (`experiments/results/joint_default/`). Errors are measured by fake-quantizing the prefill K/V with KIVI
at each width of the menu {0, 2, 4, 8, 16}. The first 4 and last 8 tokens are never evicted; with `protect="auto"`
(the default) they are held at 16 bits or allocated a width with the rest, whichever plan has the lower modelled
distortion."""),
    ("code", """fisher = fisher_importance(model, tw.calibration[:1, :C], samples=2, progress=False)
weights = scale_heads(token_weights(pre), fisher)
errors = measure_errors(pre.keys, pre.values, "kivi", [2, 4, 8])
plan = allocate_joint(weights, pre.keys, pre.values, retention=0.10, errors=errors, sink=4, window=8)
cache = CompressedCache.compress(pre.keys, pre.values, plan, "kivi")
vb, kb = np.asarray(plan.value), np.asarray(plan.key)
print("token value bits:", {int(b): f"{np.mean(vb == b):.1%}" for b in np.unique(vb)})
print("key channel bits:", {int(b): f"{np.mean(kb == b):.1%}" for b in np.unique(kb)})
print(f"bytes held {cache.compressed_nbytes:,} = plan's prediction {cache.predicted_nbytes:,}; "
      f"retention {cache.retention:.4f} of FP16")
cert = plan.certificate
print("protected tokens:", plan.meta["protect_chosen"])
print("budget used / budget:", cert["budget_used"] / plan.budget_bits, "- certified relative gap:", cert["relative_gap"])"""),
    ("md", """## Where the bytes went
One budget lets heads differ: some keep most of their tokens at a few bits, others almost none. Each cell is one
(layer, kv-head): the share of its context tokens kept (left) and the average bits of the kept values (right)."""),
    ("code", """import matplotlib.pyplot as plt
kept = (vb > 0).mean(-1)
mean_bits = np.where(vb > 0, vb, 0).sum(-1) / np.maximum((vb > 0).sum(-1), 1)
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
for ax, data, title in ((axes[0], kept, "share of tokens kept"), (axes[1], mean_bits, "mean bits of kept values")):
    im = ax.imshow(data.T, aspect="auto", cmap="viridis")
    ax.set_title(title); ax.set_xlabel("layer"); ax.set_yticks(range(data.shape[1])); fig.colorbar(im, ax=ax)
axes[0].set_ylabel("kv head"); plt.tight_layout(); plt.show()
print("tokens kept per head: min", f"{kept.min():.1%}", "median", f"{np.median(kept):.1%}", "max", f"{kept.max():.1%}")"""),
    ("md", """## Does it keep the model? Continuation KL at equal bytes
The continuation is teacher-forced through the compressed cache and compared with the full cache: KL(full ||
compressed) per token, and the NLL of the text. Rows: rdalloc's global budget, the same solver with RDKV's per-head
budget, and SnapKV-style eviction (top tokens kept at 16 bits), all at the same bytes. One window is one sample:
`experiments/results/joint/` holds the same comparison over 4 windows at 1024, 2048 and 4096 tokens."""),
    ("code", """with torch.no_grad():
    full = model(ids[None]).logits[0, C:C + M - 1].float()
targets = ids[C + 1:C + M]

def score(plan):
    cache = CompressedCache.compress(pre.keys, pre.values, plan, "kivi")
    return continuation_scores(continuation_logits(model, cache, ids[C:C + M]), full, targets)

kw = dict(errors=errors, sink=4, window=8)
makers = {"rdalloc global": lambda r: allocate_joint(weights, pre.keys, pre.values, retention=r, **kw),
          "rdalloc per-head": lambda r: allocate_joint(weights, pre.keys, pre.values, retention=r, mode="per_head", **kw),
          "eviction (SnapKV-style)": lambda r: eviction_plan(weights, pre.shape, retention=r, sink=4, window=8)}
retentions = (0.05, 0.10, 0.25)
kl = {name: [score(make(r))[1] for r in retentions] for name, make in makers.items()}
print(f"{'KL, nats/token':26s}" + "".join(f"{r:>10.0%}" for r in retentions))
for name, row in kl.items():
    print(f"{name:26s}" + "".join(f"{v:10.4f}" for v in row))
fig, ax = plt.subplots(figsize=(5, 3.2))
for name, row in kl.items():
    ax.semilogy([100 * r for r in retentions], row, "o-", label=name)
ax.set_xlabel("bytes held, % of FP16"); ax.set_ylabel("KL to the full cache"); ax.legend(); plt.show()"""),
    ("md", """## Decoding on from the compressed cache
`generate` continues from the packed cache (new tokens appended at full precision); the 10 % plan against the full
cache, greedy."""),
    ("code", """prompt = ids[None, :C + 1]
with torch.no_grad():
    ref = model.generate(prompt, max_new_tokens=16, do_sample=False)
    cache = CompressedCache.compress(pre.keys, pre.values, plan, "kivi")
    with JointAttention(model):
        out = generate(model, cache, prompt, max_new_tokens=16, do_sample=False)
print("full cache :", repr(tokenizer.decode(ref[0, C + 1:])))
print("10 % bytes :", repr(tokenizer.decode(out[0, C + 1:])))"""),
]


def build(cells, path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                for kind, src in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    nbformat.write(nb, path)
    print("wrote", path)


NOTEBOOKS = {"01_solver_walkthrough": SOLVER, "02_compress_after_prefill": JOINT}

if __name__ == "__main__":
    import sys

    (ROOT / "notebooks").mkdir(exist_ok=True)
    for name in sys.argv[1:] or NOTEBOOKS:  # e.g. python scripts/make_notebooks.py 02_compress_after_prefill
        build(NOTEBOOKS[name], ROOT / "notebooks" / f"{name}.ipynb")
