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

Every command checks its arguments and output paths before any work (:func:`floats`, :func:`widths`,
:func:`check_output`) and writes its files atomically (:func:`write_atomic`); an error is one line on stderr and exit
status 2, never a traceback, argparse's own usage errors included (:class:`Parser`; ``--help`` shows the usage).

Plans are written in the form their path's suffix names: ``--plan-out plan.json`` as JSON (head plans; readable
anywhere), ``plan.npz`` as compact binary (token plans: uint8 widths, 0.03 s for 32 x 8 x 32768 instead of 2 s);
any other suffix is refused before any work. Commands reading a plan (``rdalloc eval --plan``) take either form.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import zipfile
from collections.abc import Callable
from importlib import resources
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np

from ._io import write_atomic
from .allocate import allocate, default_menu
from .models import ExponentialModel, model_from_dict
from .plan import Plan, plan_format, read_npz_header
from .waterfill import waterfill

DEFAULT_PROBLEM = "smollm2_problem.json"
PLAN_FORMAT = "rdalloc.plan"
"""The ``"format"`` of a saved :class:`~rdalloc.plan.Plan`."""
COMMANDS_GROUP = "rdalloc.commands"


class ArgumentError(SystemExit):
    """A bad argument found before any work: :func:`main` prints it on one line and exits with status 2, as argparse
    does for the arguments it checks itself."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2


def floats(text: str, flag: str) -> np.ndarray:
    """``"1,2.5"`` -> ``[1., 2.5]``; ``ValueError`` naming ``flag`` unless every entry is a finite number."""
    try:
        values = np.asarray([float(t) for t in text.split(",")], dtype=np.float64)
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{flag} must be finite numbers, got {text!r}")
    return values


def widths(text: str, flag: str) -> tuple[int, ...]:
    """``"1,2"`` -> ``(1, 2)``; ``""`` -> ``()``; ``ValueError`` naming ``flag`` for anything but integers."""
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integer widths such as 1,2, got {text!r}") from None


def check_finite(value: float | None, flag: str) -> None:
    """``ValueError`` naming ``flag`` if ``value`` is given and is NaN or infinite."""
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{flag} must be a finite number, got {value!r}")


def one_line(error: BaseException) -> str:
    """An error's message on one line (whitespace runs, newlines included, collapsed to a space)."""
    return " ".join(str(error).split())


def check_positive(value: int, flag: str) -> None:
    """``ValueError`` naming ``flag`` unless ``value`` is at least 1."""
    if value < 1:
        raise ValueError(f"{flag} must be at least 1, got {value!r}")


def has_format(name: str) -> Callable[[Any], bool]:
    """Whether a parsed document is one of ours: an object whose ``"format"`` is ``name`` (the test remembers
    ``name`` as its ``.format``: for :data:`PLAN_FORMAT`, :func:`check_output` also checks a plan's suffix)."""
    def ours(d: Any) -> bool:
        return isinstance(d, dict) and d.get("format") == name

    ours.format = name
    return ours


def read_document(path: Path) -> Any:
    """The parsed JSON of ``path``, or the JSON header of an npz plan (:func:`rdalloc.plan.read_npz_header`);
    ``None`` if it is neither (unreadable, not JSON, another archive)."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        pass
    try:
        return read_npz_header(path) if zipfile.is_zipfile(path) else None
    except (OSError, ValueError):
        return None


def check_output(path: str | os.PathLike, flag: str, ours: Callable[[Any], bool]) -> Path:
    """``path`` checked before any work, so that writing it later can neither fail nor destroy a foreign file: its
    directory exists and is writable, it is not a directory, a plan's name ends in ``.json`` or ``.npz`` (when
    ``ours`` is ``has_format(PLAN_FORMAT)``: the suffix chooses the form, :meth:`rdalloc.Plan.save`), and a file
    already there reads (:func:`read_document`) as a document for which ``ours`` holds. ``ValueError`` naming
    ``flag`` and the path otherwise."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a directory, not a file")
    if getattr(ours, "format", None) == PLAN_FORMAT:
        try:
            plan_format(p)
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None
    if not p.parent.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: directory {str(p.parent)!r} does not exist")
    if not os.access(p.parent, os.W_OK):
        raise ValueError(f"{flag} {str(path)!r}: directory {str(p.parent)!r} is not writable")
    if p.exists():
        d = read_document(p)
        if not ours(d):
            raise ValueError(f"{flag} {str(path)!r} exists and is not a file this command writes: refusing to "
                             f"overwrite it")
    return p


def prepare_output_dir(path: str | os.PathLike, flag: str, files: dict[str, Callable[[Any], bool]]) -> Path:
    """The output directory ``path``, made (with its parents) before any work, and each of ``files`` (name -> whether
    a parsed file is ours) in it checked by :func:`check_output`. ``ValueError`` naming ``flag`` otherwise."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {str(path)!r} exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {str(path)!r} cannot be made: {e.strerror}") from None
    for name, ours in files.items():
        check_output(p / name, flag, ours)
    return p


def _load_problem(args) -> dict:
    if args.alpha is not None:
        alpha = floats(args.alpha, "--alpha")
        beta = floats(args.beta, "--beta") if args.beta else 4.0
        eviction = floats(args.eviction, "--eviction") if args.eviction else None
        model = ExponentialModel(alpha, beta if np.size(beta) > 1 else float(np.ravel(beta)[0]), eviction=eviction,
                                 lo=args.lo, hi=args.hi)
        sizes = floats(args.sizes, "--sizes")
        return {"model": model, "sizes": sizes if sizes.size > 1 else float(sizes[0]), "weights": 1.0,
                "metadata": args.metadata if args.metadata is not None else 0.0, "layout": None, "quantizer": None,
                "note": "from flags"}
    if args.problem is None:
        text = resources.files("rdalloc.data").joinpath(DEFAULT_PROBLEM).read_text()
        source = f"bundled {DEFAULT_PROBLEM}"
    else:
        path = Path(args.problem)
        if not path.is_file():
            raise ArgumentError(f"problem file {path} does not exist")
        text, source = path.read_text(), str(path)
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ArgumentError(f"{source} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(d, dict) or "model" not in d or "sizes" not in d:
        raise ArgumentError(f"{source} must be a JSON object with at least 'model' and 'sizes'")
    layout = d.get("layout")
    if layout is not None and not (isinstance(layout, dict) and all(
            isinstance(layout.get(k), int) and layout[k] > 0 for k in ("layers", "kv_heads"))):
        raise ArgumentError(f"{source}: 'layout' must be {{\"layers\": L, \"kv_heads\": H}} with positive integers, "
                            f"got {layout!r}")
    arr = lambda x: np.asarray(x, dtype=np.float64) if isinstance(x, list) else float(x)  # noqa: E731
    try:
        return {"model": model_from_dict(d["model"]), "sizes": arr(d["sizes"]), "weights": arr(d.get("weights", 1.0)),
                "metadata": arr(d.get("metadata", 0.0)) if args.metadata is None else args.metadata,
                "layout": layout, "quantizer": d.get("quantizer") or d["model"].get("quantizer"),
                "note": d.get("note", source)}
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        raise ArgumentError(f"{source} is not a valid problem: {type(e).__name__}: {one_line(e)}") from None


def print_head_table(bits: np.ndarray, layers: int, heads: int, out) -> None:
    """A head plan's widths, one line per layer: ``bits`` holds the ``layers * heads`` key widths, then the values'."""
    key, value = bits[: layers * heads].reshape(layers, heads), bits[layers * heads:].reshape(layers, heads)
    print("layer  " + "  ".join(f"K{h}" for h in range(heads)) + "   " + "  ".join(f"V{h}" for h in range(heads)),
          file=out)
    for layer in range(layers):
        print(f"{layer:5d}  " + "  ".join(f"{b:2d}" for b in key[layer]) + "   " +
              "  ".join(f"{b:2d}" for b in value[layer]), file=out)


def cmd_solve(args) -> int:
    for flag in ("--average-bits", "--budget", "--lo", "--hi", "--metadata"):
        check_finite(getattr(args, flag[2:].replace("-", "_")), flag)
    menu = widths(args.menu, "--menu") if args.menu else None
    plan_out = check_output(args.plan_out, "--plan-out", has_format(PLAN_FORMAT)) if args.plan_out else None
    p = _load_problem(args)
    model, out = p["model"], sys.stdout
    layout = p["layout"]
    head_plan = bool(layout) and int(layout["layers"]) * int(layout["kv_heads"]) * 2 == model.n_items
    if plan_out is not None and (args.continuous or not head_plan):
        raise ValueError(f"--plan-out {args.plan_out!r} needs a head plan: a menu solve (not --continuous) of a "
                         f"problem with a layout of layers x kv_heads covering its {model.n_items} items (a problem "
                         f"file's 'layout'; --alpha gives none)")
    budget = {"budget": args.budget} if args.budget is not None else {"average_bits": args.average_bits}
    print(f"problem: {p['note']} — {model.n_items} items, quantizer {p['quantizer']!r}", file=out)
    if args.continuous:
        if not isinstance(model, ExponentialModel):
            raise ArgumentError("--continuous needs an exponential model")
        r = waterfill(model, p["sizes"], weights=p["weights"], metadata=p["metadata"], **budget)
        cert = r.to_dict()
        bits = cert.pop("bits")
        print("bits: " + " ".join(f"{b:.3f}" for b in bits), file=out)
        print(json.dumps(cert, indent=2), file=out)
        return 0
    menu = menu or default_menu(model)
    r = allocate(model, p["sizes"], weights=p["weights"], metadata=p["metadata"], menu=menu, **budget)
    bits = np.asarray(r.bits)
    if head_plan:
        L, H = int(layout["layers"]), int(layout["kv_heads"])
        print_head_table(bits, L, H, out)
        if plan_out is not None:  # a plan records its quantizer: from the problem file or its model
            plan = Plan.from_allocation(r, (L, H), model=p["model"], quantizer=p["quantizer"],
                                        meta={"menu": list(menu), "source": p["note"]})
            write_atomic(plan_out, plan.save)
            print(f"plan written to {args.plan_out}", file=out)
    else:
        print("bits: " + " ".join(str(int(b)) for b in bits), file=out)
    counts = {int(b): int(c) for b, c in zip(*np.unique(bits, return_counts=True))}
    print(f"bit-width histogram: {counts}", file=out)
    print("certificate:", file=out)
    print(json.dumps(r.certificate(), indent=2), file=out)
    return 0


class Parser(argparse.ArgumentParser):
    """argparse's parser (its subcommands' parsers too), but a usage error is one line on stderr,
    ``rdalloc: error: <message> (<prog> --help shows the usage)``, and exit status 2, like every other error."""

    def error(self, message: str):
        self.exit(2, f"rdalloc: error: {' '.join(message.split())} ({self.prog} --help shows the usage)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="rdalloc", description="Rate-distortion bit allocation for KV caches.")
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
    s.add_argument("--plan-out", help="write the plan here: PATH.json as JSON, PATH.npz as compact binary (numpy)")
    s.set_defaults(func=cmd_solve)

    for plugin in entry_points(group=COMMANDS_GROUP):
        plugin.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ArgumentError as e:
        print(f"rdalloc: error: {one_line(e)}", file=sys.stderr)
        raise
    except (ValueError, TypeError, OSError) as e:  # OSError: a file that could not be read or written
        print(f"rdalloc: error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
