"""The ``rdalloc`` command line.

``rdalloc solve`` solves one allocation problem and prints the plan and its certificate. The problem comes from a
JSON file (``--problem``; by default the bundled calibration of SmolLM2-135M, ``rdalloc/data/smollm2_problem.json``)
or from flags (``--alpha``/``--beta``/``--sizes``). A problem file holds::

    {"model": <ExponentialModel or TabulatedModel dict>, "sizes": n or [n_i], "weights": w or [w_i],
     "metadata": m or [m_i], "layout": {"layers": L, "kv_heads": H}, "quantizer": "kivi", "note": "..."}

With a ``layout`` the items are the ``L * H`` key heads followed by the ``L * H`` value heads, and the plan is a head
plan over (layer, kv_head).

The real-model commands (torch and transformers are imported inside them, so ``solve`` stays light):

* ``rdalloc calibrate --out calib.json``: capture K/V over calibration windows, measure and fit each quantizer's
  distortion curve, estimate Fisher and attention-output head importance;
* ``rdalloc allocate --calibration calib.json --quantizer kivi --average-bits 3 --out plan.json``: a head plan;
* ``rdalloc eval --plan plan.json``: perplexity over evaluation windows with the plan's quantized KV cache;
* ``rdalloc demo``: all of it, perplexity vs bits for every row (quick grid by default, ``--full`` for the whole),
  writing JSON, a markdown table and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

import numpy as np

from .allocate import allocate, default_menu
from .environment import environment
from .models import ExponentialModel, model_from_dict
from .plan import Plan
from .waterfill import waterfill

DEFAULT_PROBLEM = "smollm2_problem.json"


def _floats(text: str, name: str) -> np.ndarray:
    try:
        return np.asarray([float(t) for t in text.split(",")], dtype=np.float64)
    except ValueError:
        raise SystemExit(f"rdalloc: {name} must be comma-separated numbers, got {text!r}") from None


def _load_problem(args) -> dict:
    if args.alpha is not None:
        alpha = _floats(args.alpha, "--alpha")
        beta = _floats(args.beta, "--beta") if args.beta else 4.0
        eviction = _floats(args.eviction, "--eviction") if args.eviction else None
        model = ExponentialModel(alpha, beta if np.size(beta) > 1 else float(np.ravel(beta)[0]), eviction=eviction,
                                 lo=args.lo, hi=args.hi)
        sizes = _floats(args.sizes, "--sizes")
        return {"model": model, "sizes": sizes if sizes.size > 1 else float(sizes[0]), "weights": 1.0,
                "metadata": args.metadata if args.metadata is not None else 0.0, "layout": None, "quantizer": None,
                "note": "from flags"}
    if args.problem is None:
        text = resources.files("rdalloc.data").joinpath(DEFAULT_PROBLEM).read_text()
        source = f"bundled {DEFAULT_PROBLEM}"
    else:
        path = Path(args.problem)
        if not path.is_file():
            raise SystemExit(f"rdalloc: problem file {path} does not exist")
        text, source = path.read_text(), str(path)
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"rdalloc: {source} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(d, dict) or "model" not in d or "sizes" not in d:
        raise SystemExit(f"rdalloc: {source} must be a JSON object with at least 'model' and 'sizes'")
    arr = lambda x: np.asarray(x, dtype=np.float64) if isinstance(x, list) else float(x)  # noqa: E731
    return {"model": model_from_dict(d["model"]), "sizes": arr(d["sizes"]), "weights": arr(d.get("weights", 1.0)),
            "metadata": arr(d.get("metadata", 0.0)) if args.metadata is None else args.metadata,
            "layout": d.get("layout"), "quantizer": d.get("quantizer") or d["model"].get("quantizer"),
            "note": d.get("note", source)}


def _print_head_table(bits: np.ndarray, layers: int, heads: int, out) -> None:
    key, value = bits[: layers * heads].reshape(layers, heads), bits[layers * heads:].reshape(layers, heads)
    print("layer  " + "  ".join(f"K{h}" for h in range(heads)) + "   " + "  ".join(f"V{h}" for h in range(heads)),
          file=out)
    for layer in range(layers):
        print(f"{layer:5d}  " + "  ".join(f"{b:2d}" for b in key[layer]) + "   " +
              "  ".join(f"{b:2d}" for b in value[layer]), file=out)


def cmd_solve(args) -> int:
    p = _load_problem(args)
    model, out = p["model"], sys.stdout
    budget = {"budget": args.budget} if args.budget is not None else {"average_bits": args.average_bits}
    print(f"problem: {p['note']} — {model.n_items} items, quantizer {p['quantizer']!r}", file=out)
    if args.continuous:
        if not isinstance(model, ExponentialModel):
            raise SystemExit("rdalloc: --continuous needs an exponential model")
        r = waterfill(model, p["sizes"], weights=p["weights"], metadata=p["metadata"], **budget)
        cert = r.to_dict()
        bits = cert.pop("bits")
        print("bits: " + " ".join(f"{b:.3f}" for b in bits), file=out)
        print(json.dumps(cert, indent=2), file=out)
        return 0
    menu = tuple(int(b) for b in args.menu.split(",")) if args.menu else default_menu(model)
    r = allocate(model, p["sizes"], weights=p["weights"], metadata=p["metadata"], menu=menu, **budget)
    bits = np.asarray(r.bits)
    layout = p["layout"]
    if layout and layout["layers"] * layout["kv_heads"] * 2 == bits.size:
        L, H = int(layout["layers"]), int(layout["kv_heads"])
        _print_head_table(bits, L, H, out)
        plan = Plan.from_allocation(r, (L, H), quantizer=p["quantizer"], meta={"menu": list(menu), "source": p["note"]})
        if args.plan_out:
            plan.save(args.plan_out)
            print(f"plan written to {args.plan_out}", file=out)
    else:
        print("bits: " + " ".join(str(int(b)) for b in bits), file=out)
    counts = {int(b): int(c) for b, c in zip(*np.unique(bits, return_counts=True))}
    print(f"bit-width histogram: {counts}", file=out)
    print("certificate:", file=out)
    print(json.dumps(r.certificate(), indent=2), file=out)
    return 0


# ---- real-model commands ---------------------------------------------------------------------------------------
def _add_source(p, *, windows: int, length: int, what: str) -> None:
    p.add_argument("--model", default=None, help="a local Hugging Face model directory or .gguf file (default: the "
                   "bundled SmolLM2-135M-Instruct)")
    p.add_argument("--text", default=None, help="a UTF-8 text file (default: pydoc_data.topics)")
    p.add_argument("--windows", type=int, default=windows, help=f"{what} windows (default {windows})")
    p.add_argument("--length", type=int, default=length, help=f"tokens per {what} window (default {length})")
    _add_dtype(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_dtype(p) -> None:
    p.add_argument("--dtype", default="float64", choices=("float64", "float32", "bfloat16", "float16"),
                   help="the model's dtype (default float64: low-bit results then do not depend on the CPU's SIMD "
                        "kernels; float32 is faster)")


def _check_path(path, what: str) -> None:
    if path is not None and not Path(path).expanduser().exists():
        raise ValueError(f"{what} {str(path)!r} does not exist")


def _load(args, *, calibration: int, evaluation: int, cal_length: int | None = None):
    """Model, facts and text windows; every input is checked before any long computation."""
    _check_path(args.model, "--model")
    _check_path(args.text, "--text")
    from rdalloc.backends.hf import load_model, text_windows

    model, tokenizer, facts = load_model(args.model, dtype=args.dtype, progress=not args.no_progress)
    length = args.length
    if cal_length is not None and cal_length != length:  # the demo: short calibration, longer evaluation windows
        cal = text_windows(tokenizer, length=cal_length, calibration=calibration, evaluation=0, path=args.text)
        ev = text_windows(tokenizer, length=length, calibration=0, evaluation=evaluation, path=args.text)
        # calibration windows come from the first half, evaluation windows from the second: still disjoint
        return model, facts, cal.calibration, ev.evaluation, {**ev.to_dict(), "calibration_length": cal_length,
                                                              "calibration_windows": calibration}
    tw = text_windows(tokenizer, length=length, calibration=calibration, evaluation=evaluation, path=args.text)
    return model, facts, tw.calibration, tw.evaluation, tw.to_dict()


def _bits_list(text: str, flag: str) -> tuple[int, ...]:
    """``"1,2"`` -> ``(1, 2)``; ``""`` -> ``()``."""
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integer widths such as 1,2, got {text!r}") from None


def _quantizer_names(text: str) -> list[str]:
    from .quantizers import get_quantizer

    return [get_quantizer(q.strip()).name for q in text.split(",") if q.strip()]


def cmd_calibrate(args) -> int:
    import time

    from rdalloc.backends.hf.calibrate import calibrate

    quantizers = _quantizer_names(args.quantizers)
    t0 = time.perf_counter()
    model, facts, cal, _, text = _load(args, calibration=args.windows, evaluation=0)
    c = calibrate(model, facts, cal, quantizers=quantizers, importance=args.importance.split(","),
                  default_importance=args.default_importance, probe_bits=_bits_list(args.probe_bits, "--probe-bits"),
                  probe_length=args.probe_length, text=text, progress=not args.no_progress)
    c.save(args.out)
    print(f"calibrated {facts.name} ({facts.layers} layers x {facts.kv_heads} kv-heads) on {cal.shape[0]} windows "
          f"of {cal.shape[1]} tokens in {c.timings['total']:.1f} s (wall {time.perf_counter() - t0:.1f} s with "
          f"loading): " + ", ".join(f"{k} {v:.1f} s" for k, v in c.timings.items() if k != "total"))
    for q in c.quantizers:
        b = c.betas(q)
        print(f"  {q}: pooled beta keys {b['key']:.3f}, values {b['value']:.3f}")
    print(f"calibration written to {args.out}")
    return 0


def cmd_allocate(args) -> int:
    from rdalloc.backends.hf.calibrate import Calibration
    from rdalloc.backends.hf.experiment import allocate_plan, random_plan, uniform_plan

    c = Calibration.load(args.calibration)
    q = _quantizer_names(args.quantizer)[0]
    if args.method == "uniform":
        plan = uniform_plan(c.facts, q, int(args.average_bits), tokens=args.tokens)
    elif args.method == "random":
        plan = random_plan(c.facts, q, args.average_bits, tokens=args.tokens, seed=args.seed, menu=c.menu(q))
    else:
        plan = allocate_plan(c, q, args.average_bits, tokens=args.tokens, importance=args.importance,
                             model_from=args.model_from, fixed_beta=args.beta)
    plan.save(args.out)
    u = plan.usage
    bits = np.concatenate([plan.key.ravel(), plan.value.ravel()]).astype(int)
    _print_head_table(bits, plan.layers, plan.kv_heads, sys.stdout)
    print(f"{args.method} plan for {q}: {u.average_bits:.4f} average bits with metadata "
          f"({u.average_payload_bits:.4f} payload), written to {args.out}")
    return 0


def cmd_eval_joint(args) -> int:
    _check_path(args.model, "--model")
    _check_path(args.text, "--text")
    if args.plan is not None:
        raise ValueError("rdalloc eval joint allocates its own token plans; --plan is for rdalloc eval plan")
    from rdalloc.backends.hf.joint import run_joint
    from rdalloc.backends.hf.model import load_model

    retentions = tuple(float(r) for r in args.retentions.split(","))
    model, tokenizer, _ = load_model(args.model, dtype=args.dtype, progress=not args.no_progress)
    result = run_joint(model, tokenizer, retentions=retentions, context=args.length, windows=args.windows,
                       quantizer=args.quantizer or "kivi", text_path=args.text, out_dir=args.out or "rdalloc-joint",
                       head_scale=None if args.head_scale == "none" else args.head_scale,
                       continuation=args.continuation,
                       progress=not args.no_progress)
    print(result.markdown())
    print(f"results written to {args.out or 'rdalloc-joint'}/")
    return 0


def cmd_eval(args) -> int:
    if args.what == "joint":
        return cmd_eval_joint(args)
    from rdalloc.backends.hf.experiment import check_plan, evaluate_plan

    plan = None
    if args.plan is not None:
        _check_path(args.plan, "--plan")
        plan = Plan.load(args.plan)
    model, facts, _, ev, text = _load(args, calibration=0, evaluation=args.windows)
    q = None
    if plan is not None:
        q = check_plan(plan, facts, args.quantizer)
    r = evaluate_plan(model, ev, plan, quantizer=q, progress=not args.no_progress)
    label = "FP16 (full cache)" if plan is None else f"{q} plan {args.plan}"
    print(f"{label}: perplexity {r.ppl:.4f} (nll {r.nll:.5f}) over {r.windows} windows of {ev.shape[1]} tokens")
    if args.out:
        Path(args.out).write_text(json.dumps({"plan": args.plan, "quantizer": q, "text": text, **r.to_dict(),
                                              "environment": environment(args.dtype)}, indent=1))
        print(f"result written to {args.out}")
    return 0


def cmd_demo(args) -> int:
    import time

    from rdalloc.backends.hf.calibrate import calibrate
    from rdalloc.backends.hf.experiment import FULL, QUICK, markdown_table, plot_results, run_experiment

    grid = dict(FULL if args.full else QUICK)
    for name in ("calibration_windows", "evaluation_windows", "calibration_length", "evaluation_length"):
        if getattr(args, name) is not None:
            grid[name] = getattr(args, name)
    if args.budgets:
        grid["budgets"] = tuple(float(b) for b in args.budgets.split(","))
        grid["importance_budgets"] = grid["budgets"] if args.full else grid["budgets"][len(grid["budgets"]) // 2:][:1]
    quantizers = _quantizer_names(args.quantizers)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory")
    t0 = time.perf_counter()
    args.length = grid["evaluation_length"]
    model, facts, cal, ev, text = _load(args, calibration=grid["calibration_windows"],
                                        evaluation=grid["evaluation_windows"], cal_length=grid["calibration_length"])
    t_load = time.perf_counter() - t0
    probe_bits = grid["probe_bits"] if args.probe_bits is None else _bits_list(args.probe_bits, "--probe-bits")
    c = calibrate(model, facts, cal, quantizers=quantizers, probe_bits=probe_bits, text=text,
                  progress=not args.no_progress)
    print(f"calibration: {c.timings['total']:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in c.timings.items()
                                                                   if k != "total") + ")", flush=True)
    r = run_experiment(model, c, ev, quantizers=quantizers, budgets=grid["budgets"], seeds=grid["seeds"],
                       importance_budgets=grid["importance_budgets"], progress=not args.no_progress)
    wall = time.perf_counter() - t0
    facts_extra = {**r.facts, "grid": "full" if args.full else "quick", "text": text,
                   "calibration_seconds": c.timings, "load_seconds": t_load, "wall_seconds": wall,
                   "command": "rdalloc demo" + (" --full" if args.full else ""),
                   "environment": environment(args.dtype)}
    from rdalloc.backends.hf.experiment import ExperimentResult

    r = ExperimentResult(fp16=r.fp16, rows=r.rows, facts=facts_extra)
    out.mkdir(parents=True, exist_ok=True)
    c.save(out / "calibration.json")
    r.save(out / "results.json")
    md = markdown_table(r) + (f"\nCalibration {c.timings['total']:.1f} s; whole run {wall:.1f} s wall on this "
                              f"machine ({'full' if args.full else 'quick'} grid).\n")
    (out / "results.md").write_text(md)
    plot_results(r, out / "ppl_vs_bits.png")
    print(md)
    print(f"wrote {out}/calibration.json, results.json, results.md, ppl_vs_bits.png ({wall:.1f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rdalloc", description="Rate-distortion bit allocation for KV caches.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("solve", help="solve one allocation and print the plan and its certificate")
    s.add_argument("--problem", help="problem JSON (default: the bundled SmolLM2-135M calibration)")
    s.add_argument("--alpha", help="comma-separated alpha per item (instead of --problem)")
    s.add_argument("--beta", help="comma-separated beta (one, or one per item); default 4")
    s.add_argument("--eviction", help="comma-separated eviction distortion per item (allows 0 bits)")
    s.add_argument("--sizes", default="1", help="comma-separated elements per item (one, or one per item)")
    s.add_argument("--lo", type=float, default=1.0, help="quantized range low end (with --alpha)")
    s.add_argument("--hi", type=float, default=8.0, help="quantized range high end (with --alpha)")
    s.add_argument("--metadata", type=float, default=None, help="metadata bits per quantized item")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--average-bits", type=float, default=3.0, help="budget in bits per element (default 3)")
    g.add_argument("--budget", type=float, default=None, help="budget in total bits")
    s.add_argument("--menu", help="comma-separated bit menu, e.g. 0,1,2,3,4,6,8,16 (default: the model's range)")
    s.add_argument("--continuous", action="store_true", help="solve the continuous relaxation (water-filling)")
    s.add_argument("--plan-out", help="write the plan JSON here")
    s.set_defaults(func=cmd_solve)

    c = sub.add_parser("calibrate", help="calibrate a real model: distortion fits per quantizer, head importance")
    _add_source(c, windows=2, length=256, what="calibration")
    c.add_argument("--quantizers", default="kivi,quarot", help="comma-separated quantizers (default kivi,quarot)")
    c.add_argument("--importance", default="fisher,attention", help="estimators to run (default fisher,attention)")
    c.add_argument("--default-importance", default="fisher", choices=("fisher", "attention"),
                   help="the estimator allocations use by default (default fisher: lower PPL in the demo)")
    c.add_argument("--probe-bits", default="", help="widths whose single-head KL is measured, e.g. 1,2 (needed "
                   "for 1-bit plans; default none)")
    c.add_argument("--probe-length", type=int, default=128, help="tokens of the probe window (default 128)")
    c.add_argument("--out", required=True, help="calibration JSON to write")
    c.set_defaults(func=cmd_calibrate)

    a = sub.add_parser("allocate", help="a head plan from a calibration JSON")
    a.add_argument("--calibration", required=True, help="calibration JSON (from rdalloc calibrate)")
    a.add_argument("--quantizer", default="kivi", help="the quantizer the plan is for (default kivi)")
    a.add_argument("--average-bits", type=float, required=True, help="budget, average bits with metadata charged")
    a.add_argument("--tokens", type=int, default=512, help="tokens per window the costs are charged for (default 512)")
    a.add_argument("--method", default="rdalloc", choices=("rdalloc", "uniform", "random"))
    a.add_argument("--importance", default=None, choices=("fisher", "attention"),
                   help="importance estimator (default: the calibration's)")
    a.add_argument("--model-from", default=None, help="allocate with this quantizer's model (mismatch experiment)")
    a.add_argument("--beta", type=float, default=None, help="fixed beta for every item instead of the fitted model")
    a.add_argument("--seed", type=int, default=0, help="seed of --method random")
    a.add_argument("--out", required=True, help="plan JSON to write")
    a.set_defaults(func=cmd_allocate)

    e = sub.add_parser("eval", help="plan: perplexity with a plan's quantized KV cache (no plan: the full cache); "
                       "joint: compress-after-prefill NLL/KL vs retention (joint eviction + quantization)")
    e.add_argument("what", nargs="?", choices=("plan", "joint"), default="plan")
    _add_source(e, windows=2, length=512, what="evaluation (joint: context)")
    e.add_argument("--retentions", default="0.02,0.05,0.1,0.25,0.5", help="joint: retentions vs FP16 bytes")
    e.add_argument("--head-scale", default="fisher", choices=("fisher", "none"),
                   help="joint: put each head's weights in loss units with a calibrated Fisher importance (default)")
    e.add_argument("--continuation", type=int, default=64, help="joint: teacher-forced tokens after the context")
    e.add_argument("--plan", default=None, help="plan JSON (from rdalloc allocate); omit for FP16")
    e.add_argument("--quantizer", default=None, help="apply with this quantizer (default: the plan's)")
    e.add_argument("--out", default=None, help="result JSON to write")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="calibrate, allocate and measure perplexity vs bits on the bundled model")
    d.add_argument("--model", default=None, help="a local model directory or .gguf (default: bundled SmolLM2)")
    d.add_argument("--text", default=None, help="a UTF-8 text file (default: pydoc_data.topics)")
    d.add_argument("--full", action="store_true", help="the whole grid (budgets 2..4 by 0.5, 3 random seeds)")
    d.add_argument("--budgets", default=None, help="comma-separated average bits (metadata charged)")
    d.add_argument("--probe-bits", default=None, help="widths whose single-head KL is measured (default: 1,2 with "
                   "--full, none in the quick grid; 1 joins the menu only when probed)")
    d.add_argument("--quantizers", default="kivi,quarot")
    d.add_argument("--calibration-windows", type=int, default=None)
    d.add_argument("--calibration-length", type=int, default=None)
    d.add_argument("--evaluation-windows", type=int, default=None)
    d.add_argument("--evaluation-length", type=int, default=None)
    d.add_argument("--out", default="rdalloc-demo", help="output directory (default: ./rdalloc-demo)")
    _add_dtype(d)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)
    return parser


# What the real-model commands import beyond the core (the ``hf`` extra), by top-level module name.
HF_MODULES = ("torch", "transformers", "gguf", "accelerate", "safetensors", "tqdm", "matplotlib")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in HF_MODULES:
            raise
        print(f"rdalloc: error: 'rdalloc {args.command}' needs the hf extra (module {e.name!r} is missing): "
              f"pip install 'rdalloc[hf]'", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as e:
        print(f"rdalloc: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
