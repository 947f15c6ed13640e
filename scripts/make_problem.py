"""Build ``rdalloc/data/smollm2_problem.json``: the head-allocation problem ``rdalloc solve`` solves by default.

It measures, on K/V captured from SmolLM2-135M-Instruct (``tests/data/smollm2_kv.npz``, made by
``scripts/make_kv_fixture.py``), the MSE of every (layer, kv-head) key and value at 1..8 bits with KIVI (group 32),
fits ``D(b) = alpha * beta**(-b)`` with one pooled ``beta`` for keys and one for values, and writes the model with
the items' sizes (elements per head over the captured window) and metadata (32 bits per quantization group).
Weights are 1 (plain MSE); the importance-weighted version is what ``python -m experiments.ppl_grid`` calibrates.

    python scripts/make_problem.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rdalloc import ExponentialModel
from rdalloc.fit import fit_exponential
from rdalloc.measure import measure_distortion
from rdalloc.quantizers import get_quantizer

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    data = np.load(ROOT / "tests" / "data" / "smollm2_kv.npz")
    quantizer = get_quantizer("kivi")
    bits = list(range(1, 9))
    alphas, betas, sizes, meta = [], [], [], []
    for role, name in (("key", "k"), ("value", "v")):
        x = data[name].astype(np.float32)  # [layers, kv_heads, tokens, head_dim]
        layers, heads, tokens, head_dim = x.shape
        d = np.asarray(measure_distortion(x[:, None], quantizer, bits, role=role), dtype=np.float64)
        fit = fit_exponential(d, bits, pooled=True, quantizer="kivi")
        alphas.append(np.asarray(fit.model.alpha, dtype=np.float64))
        betas.append(np.broadcast_to(np.asarray(fit.model.beta, dtype=np.float64), (layers * heads,)))
        sizes.append(np.full(layers * heads, float(tokens * head_dim)))
        m = quantizer.item_metadata_bits(role, "head", tokens, head_dim)
        meta.append(np.full(layers * heads, float(np.ravel(m)[0])))
        print(f"{role:5s}: pooled beta {float(np.ravel(fit.model.beta)[0]):.3f} over {layers}x{heads} heads")
    model = ExponentialModel(np.concatenate(alphas), np.concatenate(betas), lo=1, hi=8, quantizer="kivi")
    problem = {
        "note": "SmolLM2-135M-Instruct, 128-token window of pydoc_data.topics, KIVI (group 32), MSE per head",
        "quantizer": "kivi",
        "layout": {"layers": int(layers), "kv_heads": int(heads), "items": "keys (layer, kv_head) then values"},
        "model": model.to_dict(),
        "sizes": np.concatenate(sizes).tolist(),
        "weights": 1.0,
        "metadata": np.concatenate(meta).tolist(),
    }
    out = ROOT / "rdalloc" / "data" / "smollm2_problem.json"
    out.write_text(json.dumps(problem))
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
