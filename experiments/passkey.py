"""Passkey retrieval after compression: does the compressed cache still hold a fact buried in a long context?

    HF_HUB_OFFLINE=1 python -m experiments.passkey                 # contexts 1024,2048,4096; depths 10/50/90 %
    HF_HUB_OFFLINE=1 python -m experiments.passkey --contexts 2048 --retentions 0.05,0.1

A prompt of ``context`` tokens of filler (``--filler grass``, the default: the repeated "The grass is green. The sky is
blue. ..." of the original passkey test; ``--filler pydoc``: ``pydoc_data.topics`` prose, which this 135M model
mostly cannot see through even with the full cache) with ``"The pass key is NNNNN. Remember it. NNNNN is the pass
key."`` inserted at a relative ``depth``, ending in ``"What is the pass key? The pass key is"``. The model
(bundled SmolLM2-135M-Instruct) prefills all but the last token, the cache is compressed once
(:mod:`rdalloc.backends.hf.joint`: rdalloc's joint global allocation with Fisher-scaled hybrid weights, and the
SnapKV-style eviction baseline at the same bytes), and greedy decoding continues for 8 tokens; a trial passes when
the five digits appear in the answer. The full cache is run too: a trial it fails says the model cannot do it,
whatever the compression. Writes ``experiments/results/joint/passkey.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from rdalloc.backends.hf import load_model
from rdalloc.backends.hf.capture import fisher_importance
from rdalloc.backends.hf.compat import generate
from rdalloc.backends.hf.compress import CompressedCache, JointAttention, observe_prefill, scale_heads, token_weights
from rdalloc.backends.hf.joint import allocate_joint, eviction_plan, measure_errors
from rdalloc.backends.hf.text import default_text, tokenize

from rdalloc.environment import environment
from rdalloc.quantizers import get_quantizer

OUT = Path(__file__).resolve().parent / "results" / "joint"
GRASS = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def prompt(tokenizer, text_ids: torch.Tensor, context: int, depth: float, key: int) -> torch.Tensor:
    """``context`` token ids: filler prose with the passkey sentence at ``depth``, then the question."""
    fact = tokenize(f" The pass key is {key}. Remember it. {key} is the pass key. ", tokenizer)
    ask = tokenize(" What is the pass key? The pass key is", tokenizer)
    n = context - fact.numel() - ask.numel()
    at = int(n * depth)
    return torch.cat([text_ids[:at], fact, text_ids[at:n], ask])


@torch.no_grad()
def answer(model, ids: torch.Tensor, cache=None) -> str:
    if cache is None:
        out = model.generate(ids[None], max_new_tokens=8, do_sample=False)
    else:
        with JointAttention(model):
            out = generate(model, cache, ids[None], max_new_tokens=8, do_sample=False)
    return out[0, ids.numel():]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="1024,2048,4096")
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--retentions", default="0.05,0.1,0.25")
    p.add_argument("--filler", default="grass", choices=("grass", "pydoc"))
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args()
    t0 = time.perf_counter()
    model, tok, facts = load_model(progress=False)
    q = get_quantizer("kivi")
    prose = tokenize(default_text(), tok)
    text = prose if a.filler == "pydoc" else tokenize(GRASS * (max(int(c) for c in a.contexts.split(",")) // 10), tok)
    rng = np.random.default_rng(0)
    rows = []
    fisher = {}
    for context in (int(c) for c in a.contexts.split(",")):
        # Fisher head scale, calibrated once per length on text the prompts do not use (the last part of the text)
        fisher[context] = fisher_importance(model, prose[-context:][None], samples=2, progress=False)
        for depth in (float(d) for d in a.depths.split(",")):
            key = int(rng.integers(10000, 99999))
            ids = prompt(tok, text, context, depth, key)
            full = tok.decode(answer(model, ids))
            pre = observe_prefill(model, ids[:-1], window=32)
            err = measure_errors(pre.keys, pre.values, q, [2, 4, 8])
            w = scale_heads(token_weights(pre, method="hybrid"), fisher[context])
            row = {"context": context, "depth": depth, "key": key, "full": full, "full_ok": str(key) in full}
            for r in (float(x) for x in a.retentions.split(",")):
                for name in ("joint-global", "eviction"):
                    kw = dict(retention=r, quantizer=q, sink=4, window=8)
                    plan = (allocate_joint(w, pre.keys, pre.values, errors=err, **kw) if name == "joint-global"
                            else eviction_plan(w, pre.shape, **kw))
                    cache = CompressedCache.compress(pre.keys, pre.values, plan, q)
                    text_out = tok.decode(answer(model, ids, cache))
                    row[f"{name}@{r:g}"] = text_out
                    row[f"{name}@{r:g}_ok"] = str(key) in text_out
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"rows": rows, "seconds": time.perf_counter() - t0, "model": facts.name,
           "environment": environment(next(model.parameters()).dtype),
           "command": "HF_HUB_OFFLINE=1 python -m experiments.passkey " + " ".join(
               f"--{k} {getattr(a, k)}" for k in ("contexts", "depths", "retentions", "filler"))}
    (out / "passkey.json").write_text(json.dumps(res, indent=1))
    cols = ["full"] + [f"{n}@{r}" for r in a.retentions.split(",") for n in ("joint-global", "eviction")]
    lines = [f"Passkey retrieval, {facts.name}, KIVI g32 joint plans (sink 4, window 8 at 16 bits); cells: trials "
             f"passed / trials ({len(a.depths.split(','))} depths per context, filler {a.filler}).", "",
             "| context | " + " | ".join(c.replace("@", " @ ") for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for context in sorted({r["context"] for r in rows}):
        sel = [r for r in rows if r["context"] == context]
        cells = [f"{sum(r[c + '_ok'] for r in sel)}/{len(sel)}" for c in cols]
        lines.append(f"| {context} | " + " | ".join(cells) + " |")
    lines += ["", f"Command: `{res['command']}` ({res['seconds']:.0f} s)."]
    (out / "passkey.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
