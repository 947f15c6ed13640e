"""The real-model commands of ``rdalloc``, added to it through the ``rdalloc.commands`` entry point.

* ``rdalloc calibrate --out calib.json``: capture K/V over calibration windows, measure and fit each quantizer's
  distortion curve, estimate Fisher and attention-output head importance;
* ``rdalloc allocate --calibration calib.json --quantizer kivi --average-bits 3 --out plan.json``: a head plan;
* ``rdalloc eval --plan plan.json``: perplexity over evaluation windows with the plan's quantized KV cache (no plan:
  the full cache).

Model placement: ``--device`` (cpu, cuda, cuda:1, ...), ``--dtype`` (the model's compute dtype) and
``--attn-implementation`` (default: transformers' choice). ``--group-size`` sets the quantizers' group (KIVI: tokens per
key group and channels per value group, default 32, which must divide head_dim; the per-token quantizers: channels
per group, default the whole head_dim); ``calibrate`` records it, ``allocate`` puts it in the plan (it must match the
calibration's), ``eval`` applies the plan's unless told otherwise.

Every argument and output path is checked before the model loads; files are written atomically (:mod:`rdalloc.cli`).
Importing this module imports neither torch nor transformers (the commands do, when they run), so ``rdalloc --help``
and ``rdalloc solve`` stay light; without them a command says which extra to install.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from rdalloc.cli import (
    PLAN_FORMAT,
    check_finite,
    check_output,
    check_positive,
    has_format,
    one_line,
    print_head_table,
    widths,
    write_atomic,
)
from rdalloc.environment import environment
from rdalloc.plan import Plan
from rdalloc.quantizers import get_quantizer

from .text import BUILTIN_TEXTS

DISTORTIONS = ("fisher-mse", "fisher-error")  # calibrate.DISTORTIONS, without importing torch here
DEFAULT_DISTORTION = "fisher-error"  # calibrate.DEFAULT_DISTORTION

__all__ = ["register", "add_dtype", "check_path", "check_model", "converted_directory", "probe_widths",
           "quantizer_names", "quantizers_with", "check_placement", "HF_MODULES", "EVAL_FORMAT"]

HF_MODULES = ("torch", "transformers", "gguf", "accelerate", "safetensors", "tqdm", "matplotlib")
"""What the commands import beyond the core (the ``hf`` extra), by top-level module name."""
EVAL_FORMAT = "rdalloc.eval"
"""The ``"format"`` of the result ``rdalloc eval --out`` writes."""


def add_dtype(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32", "bfloat16", "float16"),
                        help="the model's compute dtype (default float64: low-bit results then do not depend on the "
                             "CPU's SIMD kernels; float32 is faster, bfloat16 for GPUs); rdalloc's statistics are "
                             "upcast whatever it is")


def add_placement(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--attn-implementation`` (``--dtype``: :func:`add_dtype`)."""
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda, cuda:1, mps")
    parser.add_argument("--attn-implementation", default=None,
                        help="eager, sdpa, flash_attention_2, ... (default: transformers' choice)")


def check_placement(args) -> None:
    """``--device`` and ``--attn-implementation`` checked (the device must exist here); ``ValueError`` naming the
    flag and the value."""
    from rdalloc.backends.hf.model import check_attn_implementation, model_device

    for flag, attr, check in (("--device", "device", model_device),
                              ("--attn-implementation", "attn_implementation", check_attn_implementation)):
        try:
            check(getattr(args, attr))
        except ValueError as e:
            raise ValueError(f"{flag} {getattr(args, attr)!r}: {one_line(e)}") from None


def add_group_size(parser: argparse.ArgumentParser, default_help: str) -> None:
    parser.add_argument("--group-size", type=int, default=None,
                        help="the quantizers' group: KIVI tokens per key group and channels per value group (must "
                             "divide head_dim), per-token quantizers channels per group; default: " + default_help)


def quantizers_with(names, group_size: int | None, *, head_dim: int | None = None) -> list:
    """The quantizers named ``names`` with ``group_size`` (``None``: their defaults), each checked to take a group
    size and, when ``head_dim`` is known, to group it; ``ValueError`` naming ``--group-size`` otherwise."""
    out = []
    for name in names:
        if group_size is None:
            q = get_quantizer(name)
        else:
            check_positive(group_size, "--group-size")
            try:
                q = get_quantizer(name, group_size=group_size)
            except TypeError:
                raise ValueError(f"--group-size {group_size}: quantizer {name!r} takes no group size") from None
        if head_dim is not None:
            for role in ("key", "value"):
                try:
                    q.grouping(role, head_dim)
                except ValueError as e:
                    flag = "--group-size" + ("" if group_size is None else f" {group_size}")
                    raise ValueError(f"{flag}: {one_line(e)} (pass --group-size with a divisor of {head_dim})") \
                        from None
        out.append(q)
    return out


def check_path(path, flag: str) -> None:
    """``ValueError`` naming ``flag`` if ``path`` is given and does not exist."""
    if path is not None and not Path(path).expanduser().exists():
        raise ValueError(f"{flag} {str(path)!r} does not exist")


def converted_directory(path):
    """The directory the bundled model (``path`` ``None`` or ``"smollm2"``) or a ``.gguf`` file was converted into,
    found without loading or converting anything; ``None`` when it is not converted yet (or ``path`` is no GGUF)."""
    from rdalloc.backends.hf.model import SMOLLM2, _is_conversion_of, cache_dir, smollm2_gguf

    if path is None or str(path) == SMOLLM2:
        gguf = smollm2_gguf()
    else:
        gguf = Path(path).expanduser()
        if not (gguf.is_file() and gguf.suffix == ".gguf"):
            return None
    target = cache_dir() / "models" / gguf.stem
    return target if _is_conversion_of(target, gguf) else None


def check_model(path):
    """``--model`` checked before anything loads: it exists, and a directory's ``config.json`` is a JSON object whose
    ``model_type`` transformers knows (else ``ValueError`` naming the flag, the file and the value). Returns the
    model's :class:`~rdalloc.backends.hf.model.ModelFacts`, read from that config without loading weights: a local
    directory's, or for the bundled model and a ``.gguf`` file the config of their cached conversion, or before any
    conversion the GGUF header (:func:`~rdalloc.backends.hf.model.gguf_facts`); ``None`` for a directory with no
    ``config.json`` (``load_model`` refuses it by name)."""
    from rdalloc.backends.hf.model import SMOLLM2, gguf_facts, smollm2_gguf

    bundled = path is None or str(path) == SMOLLM2
    if not bundled:
        check_path(path, "--model")
    directory = converted_directory(path)
    if directory is None and (bundled or Path(path).suffix == ".gguf"):  # not converted yet: read the GGUF header
        try:
            return gguf_facts(smollm2_gguf() if bundled else path)
        except ValueError as e:
            raise ValueError(f"--model: {one_line(e)}") from None
    if directory is None:
        directory = Path(path).expanduser()
    config = directory / "config.json"
    if not config.is_file():
        return None  # a directory load_model refuses by name
    label = f"--model {str(path)!r}" if path is not None else "--model (default: the bundled model)"
    try:
        d = json.loads(config.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{label}: {config} is not valid JSON ({one_line(e)})") from None
    from rdalloc.backends.hf.model import model_facts
    from transformers import CONFIG_MAPPING, AutoConfig

    model_type = d.get("model_type") if isinstance(d, dict) else None
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ValueError(f"{label}: {config} names no model type transformers knows "
                         f"(model_type={model_type!r})")
    try:
        return model_facts(SimpleNamespace(config=AutoConfig.from_pretrained(config.parent, local_files_only=True)))
    except (AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"{label}: {config} does not describe a model with layers and attention heads "
                         f"({type(e).__name__}: {one_line(e)})") from None


def _check_source(args):
    """The arguments :func:`_load` takes, checked; returns :func:`check_model`'s facts."""
    check_positive(args.windows, "--windows")
    check_positive(args.length, "--length")
    if args.text not in BUILTIN_TEXTS:
        check_path(args.text, "--text")
    check_placement(args)
    return check_model(args.model)


def probe_widths(text: str, flag: str) -> tuple[int, ...]:
    """The widths of a single-head KL probe, ``"1,2"`` -> ``(1, 2)``: integers in 1..8."""
    bits = widths(text, flag)
    if any(not 1 <= b <= 8 for b in bits):
        raise ValueError(f"{flag} must be quantized widths in 1..8, got {text!r}")
    return bits


def quantizer_names(text: str) -> list[str]:
    """Registered names of the comma-separated quantizers in ``text``."""
    return [get_quantizer(q.strip()).name for q in text.split(",") if q.strip()]


def _add_source(p, *, windows: int, length: int, what: str) -> None:
    p.add_argument("--model", default=None, help="a local Hugging Face model directory or .gguf file (default: the "
                   "bundled SmolLM2-135M-Instruct)")
    p.add_argument("--text", default=None, help="a UTF-8 text file, or a built-in text: "
                   "pydoc_data.topics (default) or python-source")
    p.add_argument("--windows", type=int, default=windows, help=f"{what} windows (default {windows})")
    p.add_argument("--length", type=int, default=length, help=f"tokens per {what} window (default {length})")
    add_dtype(p)
    add_placement(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _load(args, *, calibration: int, evaluation: int):
    """Model, facts and text windows (the arguments checked by :func:`_check_source` first)."""
    from rdalloc.backends.hf import load_model, text_windows

    model, tokenizer, facts = load_model(args.model, device=args.device, dtype=args.dtype,
                                         attn_implementation=args.attn_implementation, progress=not args.no_progress)
    tw = text_windows(tokenizer, length=args.length, calibration=calibration, evaluation=evaluation, path=args.text)
    return model, facts, tw.calibration, tw.evaluation, tw.to_dict()


def cmd_calibrate(args) -> int:
    from rdalloc.backends.hf.calibrate import CALIBRATION_FORMAT, IMPORTANCE_METHODS, calibrate

    quantizers = quantizer_names(args.quantizers)
    importance = [m.strip() for m in args.importance.split(",") if m.strip()]
    if not importance or any(m not in IMPORTANCE_METHODS for m in importance):
        raise ValueError(f"--importance must be comma-separated estimators among {IMPORTANCE_METHODS}, "
                         f"got {args.importance!r}")
    if args.default_importance not in importance:
        raise ValueError(f"--default-importance {args.default_importance!r} must be one of --importance "
                         f"{args.importance!r}")
    if args.distortion == "fisher-error" and "fisher" not in importance:
        raise ValueError(f"--distortion fisher-error is measured in the Fisher pass: --importance must include "
                         f"fisher, got {args.importance!r}")
    probe_bits = probe_widths(args.probe_bits, "--probe-bits")
    check_positive(args.probe_length, "--probe-length")
    config_facts = _check_source(args)
    specs = quantizers_with(quantizers, args.group_size,
                            head_dim=None if config_facts is None else config_facts.head_dim)
    out = check_output(args.out, "--out", has_format(CALIBRATION_FORMAT))
    t0 = time.perf_counter()
    model, facts, cal, _, text = _load(args, calibration=args.windows, evaluation=0)
    specs = quantizers_with(quantizers, args.group_size, head_dim=facts.head_dim)
    c = calibrate(model, facts, cal, quantizers=specs, importance=importance,
                  default_importance=args.default_importance, distortion=args.distortion, probe_bits=probe_bits,
                  probe_length=args.probe_length, text=text, progress=not args.no_progress)
    write_atomic(out, c.save)
    print(f"calibrated {facts.name} ({facts.layers} layers x {facts.kv_heads} kv-heads) on {cal.shape[0]} windows "
          f"of {cal.shape[1]} tokens in {c.timings['total']:.1f} s (wall {time.perf_counter() - t0:.1f} s with "
          f"loading): " + ", ".join(f"{k} {v:.1f} s" for k, v in c.timings.items() if k != "total"))
    for q in c.quantizers:
        b = c.betas(q)
        print(f"  {q}: pooled beta keys {b['key']:.3f}, values {b['value']:.3f}")
    print(f"calibration written to {args.out}")
    return 0


def widest_uniform_plan(calibration, quantizer, average_bits: float, *, tokens: int) -> Plan:
    """The uniform plan at the widest width (of the calibrated menu, or 16) whose average bits with metadata stay
    within ``average_bits`` (to rounding, a relative ``1e-12``); ``ValueError`` naming ``--average-bits`` if even
    the narrowest exceeds it."""
    from rdalloc.backends.hf.head_plans import uniform_plan

    quantizer = calibration.quantizer(quantizer)
    for bits in sorted({*calibration.menu(quantizer.name), 16}, reverse=True):
        plan = uniform_plan(calibration.facts, quantizer, bits, tokens=tokens)
        if plan.usage.average_bits <= average_bits * (1 + 1e-12):
            return plan
    raise ValueError(f"--average-bits {average_bits!r} is below the narrowest uniform {quantizer.name} plan "
                     f"({bits} bits: {plan.usage.average_bits:.4f} average bits with metadata)")


def cmd_allocate(args) -> int:
    from rdalloc.backends.hf.calibrate import Calibration
    from rdalloc.backends.hf.head_plans import allocate_plan, random_plan

    check_finite(args.average_bits, "--average-bits")
    check_finite(args.beta, "--beta")
    check_positive(args.tokens, "--tokens")
    if args.group_size is not None:
        check_positive(args.group_size, "--group-size")
    out = check_output(args.out, "--out", has_format(PLAN_FORMAT))
    c = Calibration.load(args.calibration)
    q = quantizer_names(args.quantizer)[0]
    quant = c.quantizer(q)  # as calibrated (its group size)
    if args.group_size is not None:
        asked = quantizers_with([q], args.group_size, head_dim=c.facts.head_dim)[0]
        if asked.spec() != quant.spec():
            raise ValueError(f"--group-size {args.group_size}: the calibration measured {quant.spec()}, not "
                             f"{asked.spec()}; calibrate again with --group-size {args.group_size}")
    if args.method == "uniform":
        plan = widest_uniform_plan(c, quant, args.average_bits, tokens=args.tokens)
    elif args.method == "random":
        plan = random_plan(c.facts, quant, args.average_bits, tokens=args.tokens, seed=args.seed, menu=c.menu(q))
    else:
        plan = allocate_plan(c, quant, args.average_bits, tokens=args.tokens, importance=args.importance,
                             model_from=args.model_from, fixed_beta=args.beta, distortion=args.distortion)
    write_atomic(out, plan.save)
    u = plan.usage
    bits = np.concatenate([plan.key.ravel(), plan.value.ravel()]).astype(int)
    print_head_table(bits, plan.layers, plan.kv_heads, sys.stdout)
    if args.method == "uniform":
        print(f"uniform width {int(bits[0])}: the widest whose average bits with metadata stay within "
              f"--average-bits {args.average_bits:g}")
    print(f"{args.method} plan for {q}: {u.average_bits:.4f} average bits with metadata "
          f"({u.average_payload_bits:.4f} payload), written to {args.out}")
    return 0


def cmd_eval(args) -> int:
    from rdalloc.backends.hf.head_plans import evaluate_plan

    plan = None
    if args.plan is not None:
        check_path(args.plan, "--plan")
        plan = Plan.load(args.plan)
    quant = None  # None: the quantizer the plan records, with its settings
    name = quantizer_names(args.quantizer)[0] if args.quantizer is not None else None
    if args.group_size is not None:
        check_positive(args.group_size, "--group-size")
    if plan is not None and (args.group_size is not None or name not in (None, plan.quantizer)):
        name = name or plan.quantizer  # another quantizer (its defaults), or a group size: not the plan's spec
        if name is None:
            raise ValueError("the plan does not record its quantizer: pass --quantizer")
        quant = quantizers_with([name], args.group_size)[0]
    config_facts = _check_source(args)
    group_flag = (f"--group-size {args.group_size}" if args.group_size is not None
                  else f"--plan {args.plan!r} (quantizer {plan.meta.get('quantizer_spec') or plan.quantizer})"
                  if plan is not None else "")
    if plan is not None and config_facts is not None:
        _check_plan(plan, config_facts, quant, group_flag)
    out = check_output(args.out, "--out", has_format(EVAL_FORMAT)) if args.out else None
    model, facts, _, ev, text = _load(args, calibration=0, evaluation=args.windows)
    q = None
    if plan is not None:
        q = _check_plan(plan, facts, quant, group_flag)
    r = evaluate_plan(model, ev, plan, quantizer=quant, progress=not args.no_progress)
    label = "FP16 (full cache)" if plan is None else f"{q} plan {args.plan}"
    print(f"{label}: perplexity {r.ppl:.4f} (nll {r.nll:.5f}) over {r.windows} windows of {ev.shape[1]} tokens")
    if out is not None:
        result = {"format": EVAL_FORMAT, "plan": args.plan, "quantizer": q, "text": text, **r.to_dict(),
                  "environment": environment(args.dtype, device=str(model.device),
                                             attn_implementation=model.config._attn_implementation)}
        write_atomic(out, lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
        print(f"result written to {args.out}")
    return 0


def _check_plan(plan, facts, quantizer, flag: str):
    """:func:`~.head_plans.check_plan`, its grouping error naming ``flag`` (where the group came from)."""
    from rdalloc.backends.hf.head_plans import check_plan

    try:
        return check_plan(plan, facts, quantizer)
    except ValueError as e:
        if "does not divide head_dim" not in str(e):
            raise
        raise ValueError(f"{flag}: {one_line(e)} (pass --group-size with a divisor of {facts.head_dim})") from None


def _needs_hf(command):
    """``command`` printing one line that names the ``hf`` extra (exit status 2) when a module of it is missing."""

    @functools.wraps(command)
    def run(args) -> int:
        try:
            return command(args)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] not in HF_MODULES:
                raise
            print(f"rdalloc: error: 'rdalloc {args.command}' needs the hf extra (module {e.name!r} is missing): "
                  f"pip install 'rdalloc[hf]'", file=sys.stderr)
            return 2

    return run


def register(sub) -> None:
    """Add ``calibrate``, ``allocate`` and ``eval`` to the ``rdalloc`` subcommands ``sub``."""
    c = sub.add_parser("calibrate", help="calibrate a real model: distortion fits per quantizer, head importance")
    _add_source(c, windows=2, length=256, what="calibration")
    c.add_argument("--quantizers", default="kivi,quarot", help="comma-separated quantizers (default kivi,quarot)")
    c.add_argument("--importance", default="fisher,attention", help="estimators to run (default fisher,attention)")
    c.add_argument("--default-importance", default="fisher", choices=("fisher", "attention"),
                   help="the estimator allocations use by default (default fisher)")
    c.add_argument("--distortion", default=None, choices=DISTORTIONS,
                   help=f"what allocations minimize by default: fisher-mse (Fisher weight x mean MSE) or fisher-error "
                        f"(Fisher-weighted error, element by element; default {DEFAULT_DISTORTION} when --importance "
                        f"includes fisher, else fisher-mse)"),
    c.add_argument("--probe-bits", default="", help="widths whose single-head KL is measured, e.g. 1,2 (needed "
                   "for 1-bit plans; default none)")
    c.add_argument("--probe-length", type=int, default=128, help="tokens of the probe window (default 128)")
    add_group_size(c, "each quantizer's own (KIVI 32)")
    c.add_argument("--out", required=True, help="calibration JSON to write")
    c.set_defaults(func=_needs_hf(cmd_calibrate))

    a = sub.add_parser("allocate", help="a head plan from a calibration JSON")
    a.add_argument("--calibration", required=True, help="calibration JSON (from rdalloc calibrate)")
    a.add_argument("--quantizer", default="kivi", help="the quantizer the plan is for (default kivi)")
    a.add_argument("--average-bits", type=float, required=True, help="budget, average bits with metadata charged")
    a.add_argument("--tokens", type=int, default=512, help="tokens per window the costs are charged for (default 512)")
    a.add_argument("--method", default="rdalloc", choices=("rdalloc", "uniform", "random"))
    a.add_argument("--importance", default=None, choices=("fisher", "attention"),
                   help="importance estimator (default: the calibration's)")
    a.add_argument("--model-from", default=None, help="allocate with this quantizer's model (mismatch experiment)")
    a.add_argument("--distortion", default=None, choices=DISTORTIONS,
                   help="fisher-mse or fisher-error (default: the calibration's)")
    a.add_argument("--beta", type=float, default=None, help="fixed beta for every item instead of the fitted model")
    a.add_argument("--seed", type=int, default=0, help="seed of --method random")
    add_group_size(a, "the calibration's (given: it must be the calibration's)")
    a.add_argument("--out", required=True, help="plan JSON to write")
    a.set_defaults(func=_needs_hf(cmd_allocate))

    e = sub.add_parser("eval", help="perplexity with a plan's quantized KV cache (no plan: the full cache)")
    _add_source(e, windows=2, length=512, what="evaluation")
    e.add_argument("--plan", default=None, help="plan JSON (from rdalloc allocate); omit for FP16")
    e.add_argument("--quantizer", default=None, help="apply with this quantizer (default: the plan's)")
    add_group_size(e, "the plan's")
    e.add_argument("--out", default=None, help="result JSON to write")
    e.set_defaults(func=_needs_hf(cmd_eval))
