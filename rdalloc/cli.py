"""The ``rdalloc`` command line.

``rdalloc solve`` solves one allocation problem and prints the plan and its certificate. The problem comes from a
JSON file (``--problem``; by default the bundled calibration of SmolLM2-135M, ``rdalloc/data/smollm2_problem.json``)
or from flags (``--alpha``/``--beta``/``--sizes``). A problem file holds::

    {"model": <ExponentialModel or TabulatedModel dict>, "sizes": n or [n_i], "weights": w or [w_i],
     "metadata": m or [m_i], "layout": {"layers": L, "kv_heads": H}, "quantizer": "kivi", "note": "..."}

With a ``layout`` the items are the ``L * H`` key heads followed by the ``L * H`` value heads, and the plan is a head
plan over (layer, kv_head).

More commands come from the ``rdalloc.commands`` entry-point group: each entry is a function that adds its
subcommands to the parser's subparsers. rdalloc's own ``hf`` entry (``rdalloc.backends.hf.cli``) adds the real-model
commands ``calibrate``, ``allocate`` and ``eval``; loading it imports neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np

from .allocate import allocate, default_menu
from .models import ExponentialModel, model_from_dict
from .plan import Plan
from .waterfill import waterfill

DEFAULT_PROBLEM = "smollm2_problem.json"
COMMANDS_GROUP = "rdalloc.commands"


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


def print_head_table(bits: np.ndarray, layers: int, heads: int, out) -> None:
    """A head plan's widths, one line per layer: ``bits`` holds the ``layers * heads`` key widths, then the values'."""
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
        print_head_table(bits, L, H, out)
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

    for plugin in entry_points(group=COMMANDS_GROUP):
        plugin.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:
        print(f"rdalloc: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
