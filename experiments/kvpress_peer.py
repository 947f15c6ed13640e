"""Outside peer for the compress-after-prefill experiment: NVIDIA's ``kvpress`` (SnapKV, ExpectedAttention).

Same model (the bundled SmolLM2-135M-Instruct, converted once by ``rdalloc.backends.hf.model.load_model`` into
``~/.cache/rdalloc/models/SmolLM2-135M-Instruct.Q4_1``), same text windows
(``text_windows(tokenizer, length=context + continuation, calibration=1, evaluation=windows)``) and same protocol as
``python -m experiments.joint_grid`` (``experiments/joint_grid.py``, docs/design.md §5): per evaluation window

* full cache: one pass over ``ids[:context + continuation]``; logits at ``context .. context + continuation - 2``
  predict the targets ``ids[context + 1 : context + continuation]``;
* compressed: prefill ``ids[:context]`` under the press (``with press(model): model.model(ids, cache=
  DynamicCache())``; kvpress hooks every attention layer and, in the prefill pass only, replaces the layer's cache
  by the ``n_kept = int(context * (1 - compression_ratio))`` highest-scoring tokens of every kv head), then
  teacher-force ``ids[context : context + continuation]`` with ``position_ids = context + arange(continuation)``
  (as kvpress's own pipeline does: the kept keys carry their rotary positions, new tokens get their true ones);
* NLL = mean -log p(target); KL(full || compressed) per token, averaged.

Equal bytes: kvpress keeps whole tokens at full precision, so a press at ``compression_ratio = 1 - r`` holds a
fraction ``r`` of the FP16 cache (payload only; no metadata). The retention reported is counted from the cache:
``sum over layers of kept tokens * kv_heads * head_dim * 2 (K, V) * 2 bytes`` over the same for ``context`` tokens
(2 bytes per element whatever dtype the CPU run computes in, docs/design.md §5).

Presses: ``SnapKVPress`` (defaults: ``window_size=64`` observation queries, always kept, ``kernel_size=5``) and
``ExpectedAttentionPress`` (defaults: ``n_future_positions=512``, ``n_sink=4`` first tokens always kept, covariance
and value norms on). SnapKV always keeps its whole observation window (padded with the top score), so at 2 %
and 5 % of 1024 tokens (20 and 51 kept, fewer than 64) it keeps only tokens of the last 64, tied, in topk order:
its 2 % and 5 % cells are "keep 20 (51) of the last 64 tokens", no scoring at all. ``snapkv_w<N>`` (e.g. ``--presses
snapkv_w8``) is SnapKV with ``window_size=N``: ``snapkv_w8`` keeps the same last 8 tokens that rdalloc's runs protect
and scores with those 8 queries (rdalloc's eviction baseline scores with 32 and also protects the first 4).

Checks run every time (stored in the JSON): (1) each press at ``compression_ratio=0`` goes through the same hook and
position path and must give the full-cache NLL/KL to ~1e-5; (2) a press that drops the *same* tokens in every layer
and head is compared with one uncompressed pass whose 4-D attention mask hides those tokens from the continuation
only, which is exactly what a correctly positioned compressed cache must compute.

Why a side environment: ``kvpress==0.5.5`` requires ``transformers<5.3`` and the project's ``.venv`` has transformers
5.23, so this script runs in its own venv (rdalloc is installed into it editable, without dependencies, only for the
text windows)::

    python3 -m venv /tmp/kvpress-env
    /tmp/kvpress-env/bin/pip install torch==2.13.0          # pinned: the CPU build; an unpinned torch pulls GBs
    /tmp/kvpress-env/bin/pip install kvpress==0.5.5         # pulls transformers 5.2.0, datasets, pandas, peft, ...
    /tmp/kvpress-env/bin/pip install --no-deps -e .         # rdalloc: text windows, NLL/KL
    /tmp/kvpress-env/bin/pip install numpy scipy array-api-compat tqdm
    HF_HUB_OFFLINE=1 /tmp/kvpress-env/bin/python -m experiments.kvpress_peer \
        --presses snapkv,snapkv_w8,expected_attention

The model directory must exist (any run of ``rdalloc`` in the main venv creates it; ``--model`` names another one).
Writes ``experiments/results/joint/kvpress.json`` and ``kvpress.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from rdalloc.environment import environment

DEFAULT_MODEL = Path.home() / ".cache" / "rdalloc" / "models" / "SmolLM2-135M-Instruct.Q4_1"
OUT = Path(__file__).resolve().parent / "results" / "joint"
PRESSES = ("snapkv", "expected_attention")
ROOT = Path(__file__).resolve().parents[1]
# rdalloc's rows shown beside the presses, those present in the joint grid's JSON (with the Fisher head scale,
# the default, and without it)
COMPARE = tuple((m, w) for m in ("joint-global", "joint-per-head", "eviction") for w in ("hybrid+fisher", "hybrid"))

_IDS_SNIPPET = """
import hashlib, sys
from transformers import AutoTokenizer
from rdalloc.backends.hf.text import text_windows
tok = AutoTokenizer.from_pretrained(sys.argv[1], local_files_only=True)
tw = text_windows(tok, length=int(sys.argv[2]), calibration=1, evaluation=int(sys.argv[3]),
                  path=sys.argv[4] or None)
print(hashlib.sha256(tw.evaluation.numpy().tobytes()).hexdigest())
"""


def main_venv_ids_sha(python: str, model: str, length: int, windows: int, text: str | None) -> str | None:
    """sha256 of the evaluation windows' token ids as the project venv (its transformers) computes them, or
    ``None`` when that venv is not there."""
    import subprocess

    if not python or not Path(python).is_file():
        return None
    out = subprocess.run([python, "-c", _IDS_SNIPPET, model, str(length), str(windows), text or ""],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
    return out.stdout.strip().splitlines()[-1]


def make_press(name: str, compression_ratio: float):
    from kvpress import ExpectedAttentionPress, SnapKVPress

    if name == "snapkv":
        return SnapKVPress(compression_ratio=compression_ratio)
    if name.startswith("snapkv_w") and name[len("snapkv_w"):].isdigit():  # e.g. snapkv_w8: window_size=8
        return SnapKVPress(compression_ratio=compression_ratio, window_size=int(name[len("snapkv_w"):]))
    if name == "expected_attention":
        return ExpectedAttentionPress(compression_ratio=compression_ratio)
    raise ValueError(f"press must be one of {PRESSES} or snapkv_w<N> (SnapKV with window_size=N), got {name!r}")


@torch.no_grad()
def compressed_run(model, press, ids_ctx, ids_cont):
    """Prefill ``ids_ctx`` under ``press``, teacher-force ``ids_cont``. Returns (continuation logits, kept tokens per
    layer)."""
    from rdalloc.backends.hf.compat import forward
    from transformers import DynamicCache

    cache = DynamicCache()
    with press(model):
        forward(model.model, cache, input_ids=ids_ctx[None])
    kept = [int(cache.layers[i].keys.shape[2]) for i in range(len(cache.layers))]
    assert all(int(cache.layers[i].values.shape[2]) == k for i, k in enumerate(kept))
    C = ids_ctx.numel()
    pos = torch.arange(C, C + ids_cont.numel())[None]
    logits = forward(model, cache, input_ids=ids_cont[None], position_ids=pos).logits[0].float()
    return logits, kept


def fixed_drop_press(keep_mask: torch.Tensor):
    """A kvpress ScorerPress that keeps the tokens ``keep_mask`` (bool ``[context]``) in every layer and head."""
    from kvpress.presses.scorer_press import ScorerPress

    n_keep = int(keep_mask.sum())

    class FixedDrop(ScorerPress):
        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            s = keep_mask.to(keys.dtype) + torch.linspace(0, 0.5, keys.shape[2], dtype=keys.dtype)
            return s.expand(keys.shape[0], keys.shape[1], -1)

    return FixedDrop(compression_ratio=1 - (n_keep + 0.5) / keep_mask.numel()), n_keep  # int(C * (1 - ratio)) = n_keep


@torch.no_grad()
def position_check(model, ids, context, continuation, seed=0):
    """Compressed run with a fixed kept set vs one full pass with a 4-D mask hiding the dropped tokens from the
    continuation queries. Returns the max |logit difference| and the two NLLs."""
    T = context + continuation
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(context, generator=g) < 0.3
    keep[:4] = True
    press, n_keep = fixed_drop_press(keep)
    logits_c, kept = compressed_run(model, press, ids[:context], ids[context:T])
    assert set(kept) == {n_keep}, (kept, n_keep)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    mask[context:, :context] &= keep[None, :]
    ref = model(input_ids=ids[None, :T], attention_mask=mask[None, None]).logits[0, context:T].float()
    targets = ids[context + 1:T]
    nll_c = float(-torch.log_softmax(logits_c[:-1], -1).gather(-1, targets[:, None]).mean())
    nll_r = float(-torch.log_softmax(ref[:-1], -1).gather(-1, targets[:, None]).mean())
    return {"kept_tokens": n_keep, "max_abs_logit_diff": float((logits_c - ref).abs().max()),
            "nll_compressed": nll_c, "nll_masked_full_pass": nll_r}


def load_ours(path: Path, settings: dict) -> dict | None:
    """rdalloc's rows from the joint grid's JSON when measured at the same context, continuation, windows and text."""
    if not path.is_file():
        return None
    j = json.loads(path.read_text())
    s = j.get("settings", {})
    if any(s.get(k) != settings[k] for k in ("context", "continuation", "windows", "text")):
        return None
    rows = [{k: r[k] for k in ("method", "weighting", "retention_target", "retention", "nll", "kl")}
            for r in j["rows"] if (r["method"], r["weighting"]) in COMPARE]
    try:
        src = str(path.resolve().relative_to(ROOT))
    except ValueError:
        src = str(path)
    return {"source": src, "full_nll": j["full_nll"], "rows": rows}


def markdown(res: dict) -> str:
    rets = res["settings"]["retentions"]
    head = "| press | " + " | ".join(f"{100 * t:g}% NLL / KL" for t in rets) + " |"
    lines = [f"Full cache NLL: {res['full_nll']:.4f} nats/token. Cells: NLL / KL (nats/token) (retention = bytes held "
             f"/ FP16 bytes, counted from the compressed cache; kvpress keeps whole tokens at 16 bits, so retention = "
             f"kept fraction = 1 - compression_ratio).", "", head, "|---|" + "---|" * len(rets)]
    for p in res["settings"]["presses"]:
        cells = []
        for t in rets:
            r = [x for x in res["rows"] if x["press"] == p and x["retention_target"] == t]
            cells.append("n/a" if not r else f"{r[0]['nll']:.4f} / {r[0]['kl']:.4f} ({100 * r[0]['retention']:.2f}%)")
        lines.append(f"| kvpress {p} | " + " | ".join(cells) + " |")
    ours = res.get("rdalloc_joint")
    if ours:
        lines += ["", f"rdalloc at the same settings (`{ours['source']}`, full cache NLL {ours['full_nll']:.4f}):", "",
                  head.replace("| press |", "| method |"), "|---|" + "---|" * len(rets)]
        for m, w in COMPARE:
            if not any((x["method"], x["weighting"]) == (m, w) for x in ours["rows"]):
                continue
            cells = []
            for t in rets:
                r = [x for x in ours["rows"] if (x["method"], x["weighting"]) == (m, w)
                     and abs(x["retention_target"] - t) < 1e-12]
                cells.append("n/a" if not r or r[0]["nll"] is None else
                             f"{r[0]['nll']:.4f} / {r[0]['kl']:.4f} ({100 * r[0]['retention']:.2f}%)")
            lines.append(f"| rdalloc {m} ({w}) | " + " | ".join(cells) + " |")
    s = res["settings"]
    c = res["checks"]
    lines += ["", f"kvpress {s['versions']['kvpress']}, transformers {s['versions']['transformers']}, torch "
                  f"{s['versions']['torch']}; SmolLM2-135M-Instruct float32 on CPU (sdpa); {s['windows']} window(s) of "
                  f"{s['context']} context + {s['continuation']} continuation tokens of {s['text']} (token ids "
                  f"sha256 {s['ids_sha256'][:16]}; main venv: "
                  f"{'identical' if s['ids_sha256_main_venv'] == s['ids_sha256'] else 'not checked'}); "
                  f"{res['seconds']:.0f} s.",
              "", f"Checks: compression_ratio=0 through the press hooks gives max |NLL - full| = "
                  f"{c['ratio0_max_abs_nll_diff']:.1e}, max KL = {c['ratio0_max_kl']:.1e}; a fixed kept set (same "
                  f"tokens in every layer and head) matches one full pass with a 4-D mask hiding the dropped tokens "
                  f"from the continuation: max |logit diff| = {c['position_max_abs_logit_diff']:.1e}.",
              "", "Reproduce:", "", "```", res["command"], "```"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--continuation", type=int, default=64)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--retentions", default="0.02,0.05,0.1,0.25,0.5")
    ap.add_argument("--presses", default=",".join(PRESSES))
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="Hugging Face model directory")
    ap.add_argument("--text", default=None, help="UTF-8 text file (default: pydoc_data.topics)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--main-python", default=str(ROOT / ".venv" / "bin" / "python"),
                    help="the project venv's python, to check that its text windows are the same ('' = skip)")
    ap.add_argument("--out-dir", default=str(OUT), help="where kvpress.json / kvpress.md go ('' = write nothing)")
    a = ap.parse_args(argv)
    retentions = [float(x) for x in a.retentions.split(",") if x]
    presses = [p for p in a.presses.split(",") if p]
    if any(not 0 < r < 1 for r in retentions):
        ap.error("retentions must be fractions in (0, 1)")
    for p in presses:
        make_press(p, 0.0)
    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import hashlib

    import kvpress
    import transformers
    from rdalloc.backends.hf.joint import continuation_scores
    from rdalloc.backends.hf.text import text_windows
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa",
                                                 local_files_only=True).to("cpu").eval()
    model.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
    cfg = model.config
    L, H = cfg.num_hidden_layers, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    C, M = a.context, a.continuation
    tw = text_windows(tok, length=C + M, calibration=1, evaluation=a.windows, path=a.text)
    full_bytes = L * C * H * D * 2 * 2
    ids_sha = hashlib.sha256(tw.evaluation.numpy().tobytes()).hexdigest()
    main_sha = main_venv_ids_sha(a.main_python, a.model, C + M, a.windows, a.text)
    print(f"token ids sha256 {ids_sha[:16]}; main venv ({a.main_python}): "
          f"{main_sha[:16] if main_sha else 'not checked'}", flush=True)
    if main_sha is not None and main_sha != ids_sha:
        raise SystemExit("the text windows differ from the main venv's: not the experiment's windows")

    per_window, full_nlls, ratio0, pos = [], [], [], []
    for wi in range(a.windows):
        ids = tw.evaluation[wi]
        with torch.no_grad():
            full = model(ids[None]).logits[0, C:C + M - 1].float()
        targets = ids[C + 1:C + M]
        full_nll = float(-torch.log_softmax(full, -1).gather(-1, targets[:, None]).mean())
        full_nlls.append(full_nll)
        print(f"window {wi}: full nll={full_nll:.5f}", flush=True)
        for p in presses:
            logits, kept = compressed_run(model, make_press(p, 0.0), ids[:C], ids[C:C + M])
            nll, kl = continuation_scores(logits, full, targets)
            ratio0.append({"window": wi, "press": p, "nll": nll, "kl": kl, "full_nll": full_nll,
                           "kept": sorted(set(kept))})
            print(f"window {wi} {p:18s} ratio=0   nll={nll:.6f} kl={kl:.2e} (full {full_nll:.6f})", flush=True)
        pos.append({"window": wi, **position_check(model, ids, C, M)})
        print(f"window {wi} position check: {pos[-1]}", flush=True)
        for p in presses:
            for r in retentions:
                logits, kept = compressed_run(model, make_press(p, 1.0 - r), ids[:C], ids[C:C + M])
                nll, kl = continuation_scores(logits, full, targets)
                nbytes = sum(k * H * D * 2 * 2 for k in kept)
                per_window.append({"window": wi, "press": p, "retention_target": r, "compression_ratio": 1.0 - r,
                                   "kept_tokens_per_layer": sorted(set(kept)), "bytes": nbytes,
                                   "retention": nbytes / full_bytes, "nll": nll, "kl": kl})
                print(f"window {wi} {p:18s} r={r:<5g} ret={nbytes / full_bytes:.4f} nll={nll:.4f} kl={kl:.4f}",
                      flush=True)

    rows = []
    for p in presses:
        for r in retentions:
            v = [x for x in per_window if x["press"] == p and x["retention_target"] == r]
            rows.append({"press": p, "retention_target": r, "compression_ratio": 1.0 - r,
                         "retention": sum(x["retention"] for x in v) / len(v),
                         "bytes": sum(x["bytes"] for x in v),
                         "nll": sum(x["nll"] for x in v) / len(v), "kl": sum(x["kl"] for x in v) / len(v),
                         "per_window": [{k: x[k] for k in ("window", "retention", "bytes", "nll", "kl",
                                                           "kept_tokens_per_layer")} for x in v]})
    cmd = ("HF_HUB_OFFLINE=1 /tmp/kvpress-env/bin/python -m experiments.kvpress_peer "
           f"--context {C} --continuation {M} --windows {a.windows} "
           f"--retentions {','.join(f'{r:g}' for r in retentions)}"
           f" --presses {','.join(presses)}" + (f" --text {a.text}" if a.text else ""))
    res = {
        "full_nll": sum(full_nlls) / len(full_nlls),
        "full_nll_per_window": full_nlls,
        "rows": rows,
        "checks": {"ratio0": ratio0,
                   "ratio0_max_abs_nll_diff": max(abs(x["nll"] - x["full_nll"]) for x in ratio0),
                   "ratio0_max_kl": max(abs(x["kl"]) for x in ratio0),
                   "position": pos,
                   "position_max_abs_logit_diff": max(x["max_abs_logit_diff"] for x in pos)},
        "settings": {"context": C, "continuation": M, "windows": a.windows, "retentions": retentions,
                     "presses": presses, "model": Path(a.model).name, "text": tw.source,
                     "ids_sha256": ids_sha, "ids_sha256_main_venv": main_sha,
                     "layers": L, "kv_heads": H, "head_dim": D, "full_bytes_per_window": full_bytes,
                     "press_parameters": {p: {k: v for k, v in vars(make_press(p, 0.0)).items()} for p in presses},
                     "retention_definition": "bytes held / FP16 bytes; kvpress holds whole tokens at 16 bits "
                                             "(2 bytes per element, no metadata), so retention = kept fraction = "
                                             "1 - compression_ratio, counted from the cache's per-layer lengths",
                     "dtype": "float32 (CPU), sdpa attention", "threads": a.threads,
                     "versions": {"kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else
                                  __import__("importlib.metadata").metadata.version("kvpress"),
                                  "transformers": transformers.__version__, "torch": torch.__version__,
                                  "python": platform.python_version()}},
        "command": cmd,
        "seconds": time.perf_counter() - t0,
        "environment": environment("float32"),
    }
    ours = f"joint_{res['settings']['windows']}x{res['settings']['context']}.json"  # the joint grid's result name
    res["rdalloc_joint"] = load_ours(Path(a.out_dir or OUT) / ours, res["settings"])
    print(markdown(res))
    if a.out_dir:
        out = Path(a.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "kvpress.json").write_text(json.dumps(res, indent=1) + "\n")
        (out / "kvpress.md").write_text(markdown(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
