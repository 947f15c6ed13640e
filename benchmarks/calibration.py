"""Calibration cost on the bundled SmolLM2-135M, as a multiple of one forward pass over the same tokens (issues 7, 19).

    python benchmarks/calibration.py                          # the quick demo's windows: 2 x 256 tokens
    python benchmarks/calibration.py --windows 4 --length 512 # the full demo's windows
    python benchmarks/calibration.py --settings 2x256,4x512   # both, one section each
    python benchmarks/calibration.py --probe-bits 1,2         # also time the single-head KL probes (slow)

Every time is **CPU time of this process** (``time.process_time``; torch at ``--torch-threads``, default 1), so a
machine shared with other jobs gives the cost of the work itself, not of the queue. The reference is one plain
forward pass, ``model(ids)`` under ``torch.no_grad()``, one window at a time as ``capture_kv`` runs them (best of 3
after a warm-up, timed before and after the calibrate runs, the smaller kept). Then ``calibrate(model, facts,
windows)`` with its defaults (quantizers kivi + quarot, importance fisher + attention, no probes unless asked) runs
``--repeats`` times, and every step of :attr:`Calibration.cpu_timings` (its best over the runs) is reported in
seconds and in forward passes, with three totals: (a) distortion only (capture + measure_fit, what rate-distortion
fitting itself costs), (b) (a) + Fisher (what an allocation with the default importance needs; the Fisher pass also
measures both quantizers' Fisher-weighted error tables at 1..8 bits), (c) everything calibrate ran.

Side by side in the same process (issue 19): the Fisher pass with its error tables computed the way they were before
the batched computation, width by width (one uniform fake quantization per width, layer and role:
:func:`width_by_width_error`), interleaved with the calibrate runs, best of as many runs: the error tables' cost
before and after, per window in forward passes.

Before timing, waits (up to ``--max-wait`` seconds) for the 1-minute load average to drop to ``--max-load``; the
load at start and end is recorded either way. Results merge into ``--out`` (JSON) and the markdown beside it, one
section per setting.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from rdalloc.environment import environment

OUT = Path(__file__).resolve().parent / "results" / "calibration.json"
TARGET = 2.0


def wait_for_load(max_load: float, max_wait: float) -> float:
    t0 = time.time()
    while os.getloadavg()[0] > max_load and time.time() - t0 < max_wait:
        print(f"load {os.getloadavg()[0]:.2f} > {max_load}: waiting", flush=True)
        time.sleep(60)
    return time.time() - t0


def time_forward(model, windows, repeats: int = 3) -> float:
    """CPU seconds of one plain forward pass over every window, one at a time (best of ``repeats``)."""
    import torch

    def once():
        t0 = time.process_time()
        with torch.no_grad():
            for w in windows:
                model(w[None].to(model.device))
        return time.process_time() - t0

    once()  # warm-up
    return min(once() for _ in range(repeats))


def width_by_width_error(grad_sq, x, quantizer, bits, role):
    """The error table as computed before the batched one: one ``fake_quantize_uniform`` per width, each summed
    against ``grad_sq`` on its own (same result, ``[..., kv_heads, len(bits)]`` float64)."""
    import torch

    from rdalloc.quantizers import fake_quantize_uniform

    g, x64 = grad_sq.double(), x.double()
    n = x.ndim
    sums = [(g * (fake_quantize_uniform(x, quantizer, int(b), role).double() - x64).pow(2)).sum(dim=(n - 4, n - 2,
                                                                                                     n - 1))
            for b in bits]
    return torch.stack(sums, dim=-1)


def time_width_by_width(model, windows) -> dict:
    """CPU seconds of :func:`~rdalloc.backends.hf.capture.fisher_error` (calibrate's Fisher step, kivi + quarot at
    calibrate's widths) with the error tables computed width by width:
    ``{"fisher": ..., "fisher_error_tables": ...}``."""
    from rdalloc.backends.hf import capture
    from rdalloc.backends.hf.calibrate import CALIBRATION_BITS, DEFAULT_QUANTIZERS

    from rdalloc.quantizers import get_quantizer

    widths = tuple(int(b) for b in CALIBRATION_BITS if 0 < int(b) < 16)
    batched = capture.fisher_weighted_error
    capture.fisher_weighted_error = width_by_width_error
    try:
        t0 = time.process_time()
        _, tables = capture.fisher_error(model, windows, [get_quantizer(q) for q in DEFAULT_QUANTIZERS], widths,
                                         progress=False)
        total = time.process_time() - t0
    finally:
        capture.fisher_weighted_error = batched
    return {"fisher": total, "fisher_error_tables": float(tables.meta["error_cpu_seconds"])}


def run_setting(model, tokenizer, facts, count: int, length: int, probe_bits, repeats: int) -> dict:
    from rdalloc.backends.hf import text_windows
    from rdalloc.backends.hf.calibrate import calibrate

    windows = text_windows(tokenizer, length=length, calibration=count, evaluation=0).calibration
    load = {"start": list(os.getloadavg())}
    before = time_forward(model, windows)
    runs, old = [], []
    for _ in range(repeats):  # interleaved: the batched tables (calibrate) and the width-by-width ones
        runs.append(dict(calibrate(model, facts, windows, probe_bits=probe_bits, progress=False).cpu_timings))
        old.append(time_width_by_width(model, windows))
    after = time_forward(model, windows)  # the best of both sides (the smaller, stricter reference)
    forward = min(before, after)
    load["end"] = list(os.getloadavg())
    steps = {k: min(t[k] for t in runs) for k in runs[0] if k != "total"}  # each step's least disturbed run
    tables = steps.pop("fisher_error_tables", None)  # part of "fisher": reported apart, not summed twice
    totals = {"(a) distortion: capture + measure_fit": steps["capture"] + steps["measure_fit"],
              "(b) (a) + fisher": steps["capture"] + steps["measure_fit"] + steps.get("fisher", 0.0),
              "(c) everything": sum(steps.values())}
    width_by_width = {k: min(t[k] for t in old) for k in old[0]}
    per_window = {"batched": {"fisher": steps["fisher"] / forward, "fisher_error_tables": tables / forward},
                  "width_by_width": {k: v / forward for k, v in width_by_width.items()}}
    return {"windows": count, "length": length, "tokens": count * length, "probe_bits": list(probe_bits),
            "clock": "process CPU time", "forward_s": forward, "forward_before_after_s": [before, after],
            "steps_s": steps, "totals_s": totals, "fisher_error_tables_s": tables,
            "width_by_width_s": width_by_width, "tables_in_forwards": per_window,
            "ratios": {k: v / forward for k, v in {**steps, **totals}.items()}, "runs": runs,
            "width_by_width_runs": old, "load": load}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Calibration cost vs one forward pass (issues 7, 19)", "",
             f"Bundled {result['model']} ({m['platform']}, {m['cpu_count']} CPU cores, torch {m['torch']}). Times are "
             f"**CPU seconds of the benchmark process** (the machine is shared; wall time would count the other jobs). "
             f"One forward pass = `model(ids)` under `torch.no_grad()`, one window at a time like `capture_kv`, "
             f"best of 3 after a warm-up, before and after the calibrate runs; calibration = "
             f"`calibrate(model, facts, windows)` with defaults (kivi + quarot, fisher + attention), each step the "
             f"best of the runs. Target: calibration within {TARGET:g}x one forward pass.", ""]
    for key, s in result["settings"].items():
        ratios = s["ratios"]
        start, end = (", ".join(f"{x:.2f}" for x in s["load"][k]) for k in ("start", "end"))
        lines += [f"## {key}", "", f"Command: `{s['command']}`  ",
                  f"Torch threads {s['torch_threads']}, best of {s['repeats']} calibrate runs per step. Load average "
                  f"(1, 5, 15 min) at start {start}, at end {end}.", "",
                  "| step | seconds | x one forward pass |", "|---|---:|---:|",
                  f"| one forward pass ({s['tokens']} tokens) | {s['forward_s']:.3f} | 1.0 |"]
        lines += [f"| {k} | {v:.2f} | {ratios[k]:.1f} |" for k, v in s["steps_s"].items()]
        lines += [f"| **{k}** | **{v:.2f}** | **{ratios[k]:.1f}** |" for k, v in s["totals_s"].items()]
        met = [k for k in s["totals_s"] if ratios[k] <= TARGET]
        if "tables_in_forwards" in s:
            t = s["tables_in_forwards"]
            lines += ["", "Fisher step (one forward, one backward and both quantizers' error tables at 1..8 bits, "
                      "per window, in forward passes), side by side in this run:", "",
                      "| error tables computed | fisher step | of which error tables |", "|---|---:|---:|",
                      f"| width by width (before) | {t['width_by_width']['fisher']:.2f} | "
                      f"{t['width_by_width']['fisher_error_tables']:.2f} |",
                      f"| all widths batched (now) | {t['batched']['fisher']:.2f} | "
                      f"{t['batched']['fisher_error_tables']:.2f} |"]
        lines += ["", f"Target {TARGET:g}x: " + (f"met by {', '.join(met)}." if met else
                  f"**not met** by any definition: the cheapest, {next(iter(s['totals_s']))}, is "
                  f"{min(ratios[k] for k in s['totals_s']):.1f}x; everything is "
                  f"{ratios['(c) everything']:.1f}x."), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--settings", default=None, help="WINDOWSxLENGTH,..., e.g. 2x256,4x512 (overrides the two above)")
    p.add_argument("--probe-bits", default="", help="time the single-head KL probes at these widths, e.g. 1,2")
    p.add_argument("--repeats", type=int, default=2, help="calibrate runs per setting (best per step)")
    p.add_argument("--max-load", type=float, default=3.0)
    p.add_argument("--max-wait", type=float, default=0.0,
                   help="seconds to wait for the load to drop (default 0: CPU time needs no quiet machine)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    settings = ([tuple(int(x) for x in s.split("x")) for s in args.settings.split(",")] if args.settings
                else [(args.windows, args.length)])
    probe_bits = tuple(int(b) for b in args.probe_bits.split(",") if b.strip())

    import torch
    from rdalloc.backends.hf import load_model

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    model, tokenizer, facts = load_model(progress=False)
    result = json.loads(args.out.read_text()) if args.out.is_file() else {"settings": {}}
    # sections timed on the wall clock (before issue 19) are not comparable with CPU-time ones: dropped
    result["settings"] = {k: v for k, v in result.get("settings", {}).items() if v.get("clock") == "process CPU time"}
    waited = wait_for_load(args.max_load, args.max_wait)
    threads = torch.get_num_threads()
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
               "torch": torch.__version__, "python": platform.python_version()}
    result.update(model=facts.name, environment=environment(next(model.parameters()).dtype), machine=machine)
    command = "python benchmarks/calibration.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for count, length in settings:
        s = run_setting(model, tokenizer, facts, count, length, probe_bits, args.repeats)
        s.update(command=command.strip(), repeats=args.repeats, torch_threads=threads, waited_for_load_s=waited)
        key = f"{count} windows x {length} tokens, {threads} thread(s)" + (f", probes {probe_bits}" * bool(probe_bits))
        result["settings"][key] = s
        print(f"{count}x{length}: forward {s['forward_s']:.3f} s; " +
              ", ".join(f"{k} {v:.1f}x" for k, v in s["ratios"].items()), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)  # written after every setting (a long run may be cut)
        args.out.write_text(json.dumps(result, indent=2))
        text = markdown(result)
        args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
