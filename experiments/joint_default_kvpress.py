"""kvpress beside the joint-default decision (issue #20): the same windows, per-token KL cells for the paired intervals.

Runs in kvpress's side environment (``experiments/kvpress_peer.py`` says why and how to build it)::

    HF_HUB_OFFLINE=1 /tmp/kvpress-env/bin/python -m experiments.joint_default_kvpress --windows 3 --length 1024
    # -> experiments/results/joint_default/kvpress_cells.json, read by
    HF_HUB_OFFLINE=1 .venv/bin/python -m experiments.joint_default --cells \
        experiments/results/joint_default/cells.json,experiments/results/joint_default/kvpress_cells.json

Per text and evaluation window (the windows of ``experiments/joint_default.py``: same tokenizer, same cut, checked by
the token hash stored with every cell), each press prunes the prefill of ``length`` tokens to a fraction ``r`` of
them (whole tokens at 16 bits: retention = kept fraction, as ``kvpress_peer.py`` counts it) and the continuation is
teacher-forced at its true positions (``kvpress_peer.compressed_run``); the per-token KL to the full cache is stored
under the row name of :data:`PRESSES`. Presses: SnapKV with 8 and 64 observation queries, ExpectedAttention, Knorm
(kvpress 0.5.5 defaults otherwise).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from experiments.kvpress_peer import DEFAULT_MODEL, compressed_run

OUT = Path(__file__).resolve().parent / "results" / "joint_default"
TEXTS = ("pydoc_data.topics", "python-source")
PRESSES = {"kvpress SnapKV (8 obs. queries)": ("snapkv", 8), "kvpress SnapKV (64 obs. queries)": ("snapkv", 64),
           "kvpress ExpectedAttention": ("expected_attention", None), "kvpress Knorm": ("knorm", None)}


def make(row: str, compression_ratio: float):
    from kvpress import ExpectedAttentionPress, KnormPress, SnapKVPress

    kind, w = PRESSES[row]
    if kind == "snapkv":
        return SnapKVPress(compression_ratio=compression_ratio, window_size=w)
    if kind == "expected_attention":
        return ExpectedAttentionPress(compression_ratio=compression_ratio)
    return KnormPress(compression_ratio=compression_ratio)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--continuation", type=int, default=64)
    ap.add_argument("--retentions", default="0.02,0.05,0.1,0.25,0.5")
    ap.add_argument("--texts", default=",".join(TEXTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--cells", default=str(OUT / "kvpress_cells.json"))
    ap.add_argument("--presses", default=";".join(PRESSES), help="semicolon-separated rows of PRESSES to run")
    a = ap.parse_args(argv)
    presses = [x.strip() for x in a.presses.split(";") if x.strip()]
    bad = [x for x in presses if x not in PRESSES]
    if bad:
        ap.error(f"unknown --presses {bad}; known: {list(PRESSES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(a.threads)
    import kvpress  # noqa: F401  (fails early outside the side environment)
    import transformers
    from rdalloc.backends.hf.text import text_windows
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa",
                                                 local_files_only=True).eval()
    model.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
    C, M = a.length, a.continuation
    retentions = [float(x) for x in a.retentions.split(",") if x]
    path = Path(a.cells)
    path.parent.mkdir(parents=True, exist_ok=True)
    cells = json.loads(path.read_text()) if path.exists() else {}
    for text in [t for t in a.texts.split(",") if t]:
        tw = text_windows(tok, length=C + M, calibration=1, evaluation=a.windows, path=text)
        for wi in range(a.windows):
            ids = tw.evaluation[wi]
            h = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
            with torch.no_grad():
                full = model(ids[None]).logits[0, C:C + M - 1].float()
            lf = torch.log_softmax(full.double(), -1)
            targets = ids[C + 1:C + M]
            for row in presses:
                for r in retentions:
                    key = f"{text}|{wi}|{row}|{r:g}"
                    if cells.get(key, {}).get("ids") == h:
                        continue
                    t0 = time.perf_counter()
                    logits, kept = compressed_run(model, make(row, 1.0 - r), ids[:C], ids[C:C + M])
                    lp = torch.log_softmax(logits[:-1].double(), -1)
                    kl = (lf.exp() * (lf - lp)).sum(-1)
                    cells[key] = {"ids": h, "kl": kl.tolist(), "nll": float(-lp.gather(-1, targets[:, None]).mean()),
                                  "retention": sum(kept) / (len(kept) * C), "kept_per_layer": sorted(set(kept)),
                                  "seconds": time.perf_counter() - t0,
                                  "versions": {"kvpress": "0.5.5", "transformers": transformers.__version__}}
                    print(f"{text} w{wi} {row:34s} r={r:g} kl={float(kl.mean()):.4f}", flush=True)
            path.write_text(json.dumps(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
