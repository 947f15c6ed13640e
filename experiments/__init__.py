"""The experiments behind the papers' tables, on the bundled SmolLM2-135M-Instruct; not part of the installed library.

Run from the repository root (results go to ``experiments/results/``):

* ``python -m experiments.ppl_grid`` — per-head plans, perplexity vs bits (``rdalloc.backends.hf.head_plans``);
  quick grid by default, ``--full`` for the whole.
* ``python -m experiments.joint_grid`` — compress after prefill: continuation NLL/KL vs retention
  (``rdalloc.backends.hf.joint``).
* ``python -m experiments.passkey`` — passkey retrieval from a compressed cache.
* ``python -m experiments.kvpress_peer`` — NVIDIA kvpress on the same protocol (in its own environment).
"""
